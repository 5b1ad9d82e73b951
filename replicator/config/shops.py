"""Config sections of the order import: ``[[shops]]`` (the connectors) and ``[orders]``.

``ShopSection`` belongs to the connectors; ``OrdersSection`` belongs to the order import.

Secrets (``consumer_key``, ``consumer_secret``, ``token``, ``client_id``, ``client_secret``,
``webhook_secret``) may be written in
the file, or — better — named by ``<secret>_env`` (an environment variable) or ``<secret>_file`` (a
file; relative paths are looked up in systemd's ``$CREDENTIALS_DIRECTORY``), resolved like the ERP
password.
They are ``SecretStr``: never printed by ``repr``, logs or validation errors.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from replicator.config.core import Section, read_secret

_SECRETS = (
    "consumer_key",
    "consumer_secret",
    "token",
    "client_id",
    "client_secret",
    "webhook_secret",
)


def _resolve_secrets(data: dict[str, Any]) -> dict[str, str]:
    """Secrets named by ``<key>_env``/``<key>_file``; ValueError names the key, never the value."""
    out = {}
    for key in _SECRETS:
        env, file = data.get(f"{key}_env"), data.get(f"{key}_file")
        if env and file:
            raise ValueError(f"{key}: set {key}_env or {key}_file, not both")
        if (env or file) and data.get(key) is not None:
            raise ValueError(f"{key}: written in the file and also named by {key}_env/_file")
        try:
            secret = read_secret(env, file)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
        if secret is not None:
            if not secret:
                raise ValueError(f"{key}: the secret from {key}_env/_file is empty")
            out[key] = secret
    return out


class ShopSection(Section):
    """``[[shops]]``: one webshop connector.

    ``kind``: ``woocommerce`` and ``magento`` poll the shop's REST API; ``shopify`` the Admin
    GraphQL API (``token``: the app's Admin API access token; ``webhook_secret``: its client secret,
    for webhooks); ``shopware`` the Shopware 6 Admin API (``client_id``/``client_secret``: the
    integration's access key id and secret access key; ``webhook_secret``: the app's shop secret,
    for app webhooks); ``inbox`` reads JSON order
    files dropped into ``inbox_dir``; ``webhook`` receives WooCommerce webhooks (and, when ``url``
    and keys are set, uses the REST API for stock, invoices and catch-up polls)::

        [[shops]]
        name = "webshop"
        kind = "woocommerce"
        url = "https://shop.example.com"
        consumer_key_file = "woo_ck"        # systemd LoadCredential=woo_ck:/etc/sync-daemon/woo_ck
        consumer_secret_file = "woo_cs"

        [[shops]]
        name = "dropbox"
        kind = "inbox"
        inbox_dir = "/var/lib/sync-daemon/inbox"   # writers: write NAME.json.tmp, then rename
    """

    name: str
    url: str | None = None

    consumer_key: SecretStr | None = None
    consumer_key_env: str | None = None
    consumer_key_file: str | None = None
    consumer_secret: SecretStr | None = None
    consumer_secret_env: str | None = None
    consumer_secret_file: str | None = None
    token: SecretStr | None = None
    token_env: str | None = None
    token_file: str | None = None
    client_id: SecretStr | None = None
    client_id_env: str | None = None
    client_id_file: str | None = None
    client_secret: SecretStr | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None

    # Seconds for one HTTP request (connect is capped at 10 s).
    timeout: float = Field(default=30.0, gt=0, le=600)
    # Orders per page when polling (WooCommerce and Magento: at most 100).
    per_page: int = Field(default=100, ge=1, le=100)
    verify_tls: bool = True
    # Magento MSI source that stock levels are written to.
    source_code: str = "default"
    # WooCommerce, Shopify, Shopware fallback: link put next to the invoice, e.g.
    # "https://erp.example/inv/{filename}".
    invoice_url: str | None = None

    # Shopify: the Admin API version the connector is written for (pinned; Shopify answers an
    # unsupported one with its oldest supported version, which the connector logs).
    api_version: str = Field(default="2025-10", pattern=r"^\d{4}-\d{2}$")
    # Shopify: the e-number is the order name ("#1001") or the numeric order id.
    e_number_field: Literal["name", "id"] = "name"
    # Shopify: the location whose "available" quantity the ERP stock sets (numeric id or gid);
    # may be left out when the store has one location.
    location_id: str | None = None
    # Shopify: where the ERP invoice is recorded on the order: a metafield or the order note.
    invoice_target: Literal["metafield", "note"] = "metafield"
    # Shopify: "namespace.key" of that metafield.
    invoice_metafield: str = Field(
        default="sync_daemon.erp_invoice", pattern=r"^[A-Za-z0-9_-]{3,255}\.[A-Za-z0-9_-]{2,64}$"
    )

    # Inbox folder: where order files arrive; processed/ and failed/ are created inside it.
    inbox_dir: str | None = None
    # Seconds a file's size and mtime must stay unchanged before it is read (when not renamed in).
    inbox_settle: float = Field(default=2.0, ge=0, le=3600)

    # Webhook receiver.
    webhook_secret: SecretStr | None = None
    webhook_secret_env: str | None = None
    webhook_secret_file: str | None = None
    # Largest accepted webhook body in bytes (WooCommerce orders are a few KiB).
    max_body: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    # Seconds a webhook sender may take to send its body.
    body_timeout: float = Field(default=10.0, gt=0, le=300)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError(
                "must be letters, digits, '.', '_' or '-' (at most 63), e.g. 'webshop'"
            )
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be the shop's base URL, e.g. https://shop.example.com")
        if parts.username or parts.password or parts.query:
            raise ValueError("must not carry credentials or a query; use consumer_key/token keys")
        return v.rstrip("/")

    # Declared last on purpose: its validator sees every other key, and an error it raises is
    # reported as "shops.N.kind = 'woocommerce': ..." — never echoing the section, whose input may
    # hold a secret written in the file.
    kind: Literal["woocommerce", "magento", "shopify", "shopware", "inbox", "webhook"]

    @field_validator("kind")
    @classmethod
    def _kind_needs(cls, kind: str, info: ValidationInfo) -> str:
        data = info.data
        resolved = _resolve_secrets(data)
        need: tuple[str, ...] = ()
        if kind == "woocommerce":
            need = ("url", "consumer_key", "consumer_secret")
        elif kind in ("magento", "shopify"):
            need = ("url", "token")
        elif kind == "shopware":
            need = ("url", "client_id", "client_secret")
        elif kind == "inbox":
            need = ("inbox_dir",)
        elif kind == "webhook":
            need = ("webhook_secret",)
            if data.get("url") is not None:
                need += ("consumer_key", "consumer_secret")
        missing = [k for k in need if resolved.get(k, data.get(k)) is None]
        if missing:
            name = data.get("name", "?")
            raise ValueError(f"shop {name!r} of kind {kind!r} needs {', '.join(missing)}")
        return kind

    @model_validator(mode="after")
    def _resolve(self) -> ShopSection:
        for key, value in _resolve_secrets(self.__dict__).items():
            object.__setattr__(self, key, SecretStr(value))
        return self

    def secret(self, key: str) -> str:
        """The plain value of a secret key ('' when unset); only connectors should call this."""
        value = getattr(self, key)
        return value.get_secret_value() if isinstance(value, SecretStr) else ""


class OrdersSection(Section):
    """``[orders]``: order import settings."""

    enabled: bool = False
