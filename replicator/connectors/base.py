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

Order sources that are not queried by time window deliver differently:
:class:`replicator.connectors.inbox.InboxConnector`'s ``fetch_orders`` yields every complete file
waiting in the folder whatever its time (a dropped file is a delivery) and moves it to processed/
once the consumer asks for the next order; it also offers ``poll``/``mark_done``/``mark_failed``
for consumers that decide per order. Webhooks arrive through
:class:`replicator.connectors.webhook.WebhookReceiver` (a store callback the ledger provides); a
webhook shop's connector polls the REST API when it has one and yields nothing otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
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
