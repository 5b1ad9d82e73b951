"""Webshop connectors: where orders come from (REST polling, webhooks, an inbox folder) and where
stock levels and invoices go to.

:func:`make_connectors` builds the connectors of a whole config — the one set the daemon's
services and the CLI's order import use; :func:`make_connector` builds the one a ``[[shops]]``
section describes. The rest of the daemon only sees
:class:`~replicator.connectors.base.ShopConnector`. Webhook shops also need a
:class:`~replicator.connectors.webhook.WebhookReceiver` (:func:`make_webhook_receiver`), whose
store callback the order ledger provides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from replicator.config import Config
from replicator.config.shops import ShopSection
from replicator.connectors.base import ShopConnector, ShopError, ShopOrder, StockUpdate
from replicator.connectors.inbox import InboxConnector
from replicator.connectors.magento import MagentoConnector
from replicator.connectors.shopify import ShopifyConnector, ShopifyWebhookReceiver
from replicator.connectors.shopware import ShopwareConnector, ShopwareWebhookReceiver
from replicator.connectors.webhook import WebhookDelivery, WebhookReceiver
from replicator.connectors.woocommerce import WooCommerceConnector

__all__ = [
    "ShopConnector",
    "WebhookOnlyConnector",
    "make_connector",
    "make_connectors",
    "make_webhook_receiver",
]


class WebhookOnlyConnector(ShopConnector):
    """A shop that only delivers orders by webhook and has no REST access configured."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        # Orders arrive through the webhook receiver; there is nothing to poll.
        return iter(())

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        return None

    def _no_rest(self, what: str) -> ShopError:
        return ShopError(
            f"shop {self.name!r} has no REST access configured, so it cannot {what}; "
            "set url, consumer_key and consumer_secret in its [[shops]] section"
        )

    def push_stock(self, updates: list[StockUpdate]) -> list[str]:
        raise self._no_rest("receive stock levels")

    def fetch_stock(self) -> Iterator[StockUpdate]:
        raise self._no_rest("report stock levels")

    def attach_invoice(self, e_number: str, filename: str, pdf: bytes) -> None:
        raise self._no_rest("receive invoices")


def make_connectors(cfg: Config) -> dict[str, ShopConnector]:
    """The connector of every shop there is something to reach at (REST, GraphQL, an inbox
    folder), by shop name; a ``webhook`` shop without ``url`` has none — its orders arrive by
    webhook only, and the order import works off its inbox without polling. A relative
    ``inbox_dir`` is resolved against the config file's directory."""
    base = Path(cfg.source_path).parent if cfg.source_path else None
    return {
        s.name: make_connector(s, base)
        for s in cfg.shops
        if not (s.kind == "webhook" and s.url is None)
    }


def make_connector(shop: ShopSection, base_dir: Path | None = None) -> ShopConnector:
    """The connector for one ``[[shops]]`` section; ``base_dir`` resolves a relative inbox_dir."""
    if shop.kind == "magento":
        assert shop.url is not None  # the section validator guarantees it
        return MagentoConnector(
            shop.name,
            shop.url,
            shop.secret("token"),
            timeout=shop.timeout,
            per_page=shop.per_page,
            source_code=shop.source_code,
            verify_tls=shop.verify_tls,
        )
    if shop.kind == "shopify":
        assert shop.url is not None
        return ShopifyConnector(
            shop.name,
            shop.url,
            shop.secret("token"),
            api_version=shop.api_version,
            timeout=shop.timeout,
            per_page=shop.per_page,
            e_number_field=shop.e_number_field,
            location_id=shop.location_id,
            invoice_target=shop.invoice_target,
            invoice_url=shop.invoice_url,
            metafield=shop.invoice_metafield,
            verify_tls=shop.verify_tls,
        )
    if shop.kind == "shopware":
        assert shop.url is not None
        return ShopwareConnector(
            shop.name,
            shop.url,
            shop.secret("client_id"),
            shop.secret("client_secret"),
            timeout=shop.timeout,
            per_page=shop.per_page,
            invoice_url=shop.invoice_url,
            verify_tls=shop.verify_tls,
        )
    if shop.kind == "woocommerce" or (shop.kind == "webhook" and shop.url is not None):
        assert shop.url is not None
        return WooCommerceConnector(
            shop.name,
            shop.url,
            shop.secret("consumer_key"),
            shop.secret("consumer_secret"),
            timeout=shop.timeout,
            per_page=shop.per_page,
            invoice_url=shop.invoice_url,
            verify_tls=shop.verify_tls,
        )
    if shop.kind == "inbox":
        assert shop.inbox_dir is not None
        directory = Path(shop.inbox_dir)
        if not directory.is_absolute() and base_dir is not None:
            directory = base_dir / directory
        return InboxConnector(shop.name, directory, settle=shop.inbox_settle)
    return WebhookOnlyConnector(shop.name)


def make_webhook_receiver(
    shop: ShopSection, store: Callable[[WebhookDelivery], bool]
) -> WebhookReceiver:
    """The webhook receiver of a shop with a ``webhook_secret`` (WooCommerce's, or the
    platform's own for Shopify and Shopware); ``store`` is the ledger's callback (it stores the
    raw delivery atomically with its de-duplication keys, False for a duplicate)."""
    secret = shop.secret("webhook_secret")
    if shop.kind == "shopify":
        return ShopifyWebhookReceiver(
            secret, shop.max_body, store, shop=shop.name, e_number_field=shop.e_number_field
        )
    if shop.kind == "shopware":
        return ShopwareWebhookReceiver(secret, shop.max_body, store, shop=shop.name)
    return WebhookReceiver(secret, shop.max_body, store, shop=shop.name)
