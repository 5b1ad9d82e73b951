"""Config sections of operations: ``[notify]`` (incident e-mail/webhook) and ``[schedules]``.

Example::

    [notify]
    enabled = true
    reminder_minutes = 10
    webhook_url = "https://chat.example.com/hooks/abc"   # optional; a secret, never logged

    [notify.smtp]
    host = "mail.example.com"
    port = 587
    starttls = true
    username = "sync-daemon"
    password_file = "smtp-password"      # or password_env = "SMTP_PASSWORD", or password = "..."
    from = "sync-daemon@example.com"
    to = ["ops@example.com", "shop-owner@example.com"]
    # ca_file = "/etc/ssl/private-ca.pem"   # mail server with a private CA; timeout = 15

    [schedules]
    orders = "*/5 * * * *"      # crontab, "every 5m" or "continuous"
    reconcile = "0 * * * *"
    capture = "continuous"
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from replicator.config.core import Section, read_secret
from replicator.schedules import Schedule


class SmtpSection(Section):
    """``[notify.smtp]``: the mail server incidents are sent through."""

    # ``from`` is a Python keyword: the attribute is ``sender``, the TOML key stays ``from``.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    host: str
    port: int = Field(default=587, ge=1, le=65535)
    # STARTTLS upgrade on a plain connection (port 587) versus implicit TLS (port 465).
    starttls: bool = True
    ssl: bool = False
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None
    password_file: str | None = None
    sender: str = Field(alias="from")
    to: tuple[str, ...] = Field(min_length=1)
    timeout: float = Field(default=15.0, gt=0, le=300)
    # CA bundle for a mail server with a private CA (the system's trust store otherwise).
    ca_file: str | None = None

    @field_validator("sender")
    @classmethod
    def _address(cls, v: str) -> str:
        if "@" not in v:
            raise ValueError("must be an e-mail address")
        return v

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for addr in v:
            if "@" not in addr:
                raise ValueError(f"{addr!r} is not an e-mail address")
        return v

    # Problems are reported on single fields: an error on the whole table would echo its
    # values, password included, in the config error message.
    @field_validator("ssl")
    @classmethod
    def _one_tls_mode(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("starttls"):
            raise ValueError("starttls and ssl are exclusive: ssl for port 465, starttls for 587")
        return v

    @field_validator("password", "password_env", "password_file")
    @classmethod
    def _needs_username(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("username"):
            raise ValueError("a password needs a username")
        return v

    @field_validator("password_env")
    @classmethod
    def _env_set(cls, v: str | None) -> str | None:
        read_secret(v, None)
        return v

    @field_validator("password_file")
    @classmethod
    def _file_readable(cls, v: str | None) -> str | None:
        read_secret(None, v)
        return v

    @model_validator(mode="after")
    def _resolve(self) -> SmtpSection:
        secret = read_secret(self.password_env, self.password_file)
        if secret is not None:
            object.__setattr__(self, "password", SecretStr(secret))
        return self


class NotifySection(Section):
    """``[notify]``: e-mail and webhook notifications of incidents."""

    enabled: bool = False
    smtp: SmtpSection | None = None
    # Chat/incident webhook receiving a JSON POST; the URL often embeds a token, so SecretStr.
    webhook_url: SecretStr | None = None
    webhook_timeout: float = Field(default=10.0, gt=0, le=120)
    # While an incident lasts, a digest of what still fails goes out this often.
    reminder_minutes: float = Field(default=10.0, gt=0)

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _has_transport(self) -> NotifySection:
        if self.enabled and self.smtp is None and self.webhook_url is None:
            raise ValueError("enabled, but neither [notify.smtp] nor webhook_url is configured")
        return self


class SchedulesSection(Section):
    """``[schedules]``: when each service runs (crontab, ``every 5m`` or ``continuous``)."""

    orders: str = "*/5 * * * *"
    reconcile: str = "0 * * * *"
    capture: str = "continuous"
    invoices: str = "every 30s"

    @field_validator("*")
    @classmethod
    def _valid(cls, v: str) -> str:
        try:
            Schedule.from_text(v)
        except ValueError as exc:  # the loader prefixes file and key: schedules.orders = '...'
            raise ValueError(str(exc)) from None
        return v

    def schedule(self, service: str) -> Schedule:
        """The parsed schedule of ``service`` (KeyError for an unknown service)."""
        if service not in type(self).model_fields:
            raise KeyError(service)
        expr: str = getattr(self, service)
        return Schedule.parse(expr, f"schedules.{service}")

    def all(self) -> dict[str, Schedule]:
        """Every service's parsed schedule, in declaration order."""
        return {name: self.schedule(name) for name in type(self).model_fields}
