"""The webshop connector contract.

One small interface per webshop API; each backend in its own module, one contract test suite
(``tests/test_connectors_contract.py``) run against every backend's loopback emulator.

Contract:

* ``fetch_orders(since, until)`` yields every order whose *modification* time (UTC) lies in
  ``[since, until)``, each exactly once per call, however the API paginates (Magento repeats the
  last page when asked past the end; WooCommerce tells the page count in ``X-WP-TotalPages``);
* every :class:`ShopOrder` carries the raw bytes the shop sent for that order, so the ledger can
  keep the payload as received;
* transient failures (network, 5xx, 429) raise :class:`replicator.errors.RetryableError` (with
  ``retry_after`` seconds when the shop said so); anything else that is the shop's fault raises
  :class:`ShopError` with a message a person can act on; no message ever contains a credential;
* ``fetch_order`` returns None for an e-number the shop does not know; ``attach_invoice`` raises
  :class:`ShopError` for one.

Acknowledgement (design invariant 6; one rule for every intake path): an order is acknowledged
to where it came from only after the order-inbox commit that holds it. The importer stores each
page of fetched orders in one staging transaction (:meth:`replicator.orders.inbox.Inbox.receive`)
and only then calls :meth:`ShopConnector.acknowledge` with that page. What acknowledging means is
the source's business:

* a polled shop (WooCommerce, Magento): nothing per order — its acknowledgement is the watermark,
  which the importer saves after every page of the window is committed;
* the inbox folder (:class:`replicator.connectors.inbox.InboxConnector`): the files move to
  processed/; a file whose order was never acknowledged stays and is offered again;
* a webhook (:class:`replicator.connectors.webhook.WebhookReceiver`): the 2xx answer, sent when the
  store callback (``Inbox.receive`` underneath) has returned.

A restart re-offers whatever was not acknowledged; the inbox de-duplicates what was already stored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from replicator.errors import FatalError, RetryableError


class ShopError(FatalError):
    """The shop answered something we cannot use (bad credentials, malformed body...)."""


class ShopUnavailable(RetryableError):
    """The shop is down, slow or rate-limiting; ``retry_after`` is its hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ShopOrder:
    """An order as the shop sent it; ``e_number`` is the shop's order id/number."""

    shop: str
    e_number: str
    status: str
    updated_at: datetime
    payload: dict[str, Any]
    raw: bytes
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StockUpdate:
    """An absolute quantity for one SKU (never a delta: a replay is harmless)."""

    sku: str
    quantity: int


class ShopConnector(ABC):
    """One webshop."""

    name: str

    @abstractmethod
    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        """Orders modified in ``[since, until)`` (UTC)."""

    def acknowledge(self, orders: Sequence[ShopOrder]) -> None:  # noqa: B027 - optional hook
        """``orders`` are committed to the order inbox: the source may forget them. Called only
        after that commit; the default does nothing (a polled shop's watermark is the importer's)."""

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        """One order by e-number, or None when the shop does not know it."""
        raise NotImplementedError

    def push_stock(self, updates: list[StockUpdate]) -> list[str]:
        """Set absolute stock quantities (batch endpoint where the shop has one, chunked to its
        limit); returns the SKUs the shop does not know or refused — skipped and logged, while
        every other SKU was written (an ERP usually stocks articles the shop does not sell)."""
        raise NotImplementedError

    def fetch_stock(self) -> Iterator[StockUpdate]:
        """Every SKU's quantity as the shop has it (for the full reconcile)."""
        raise NotImplementedError

    def attach_invoice(self, e_number: str, filename: str, pdf: bytes) -> None:
        """Attach an invoice PDF to the shop order ``e_number``."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release HTTP connections."""
