"""Polling a shop: the download window, its watermark, and the shop's failure count.

Per shop the ledger keeps a :class:`~replicator.orders.ledger.ShopState`. A cycle downloads the
orders changed in ``[watermark - overlap, now)`` (the first time ``first_lookback_hours`` back)
into the inbox, and once a day (``reconcile_interval_hours``) sweeps the last ``reconcile_days``
the same way. The watermark advances only after everything the window covered is committed to
the ledger (an order the ERP could not take yet stays ``awaiting`` there, so moving the
watermark loses nothing).

A cycle in which the shop or the ERP is unreachable counts as failed; after
``max_consecutive_failures`` the shop's import is cancelled ("cancelled: too many consecutive
errors") and only probed every ``probe_interval_minutes``; ``sync-daemon download`` restarts it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import structlog

from replicator.config.orders import OrdersSection
from replicator.connectors.base import ShopConnector, ShopOrder
from replicator.errors import RetryableError
from replicator.errors_map import is_retryable
from replicator.orders.inbox import Inbox, Offered
from replicator.orders.ledger import Ledger, ShopState
from replicator.orders.results import CycleResult, naive
from replicator.orders.retry import RetryPolicy
from replicator.orders.writer import db_message

log = structlog.get_logger(__name__)

CANCELLED = "cancelled: too many consecutive errors"
PAGE = 100  # orders committed to the inbox in one staging transaction


def _as_generator(it: Iterator[ShopOrder]) -> Generator[ShopOrder, None, None]:
    yield from it


class ShopPolling:
    """Download windows, watermarks and failure counts of the polled shops."""

    def __init__(
        self, ledger: Ledger, inbox: Inbox, ocfg: OrdersSection, retries: RetryPolicy
    ) -> None:
        self.ledger = ledger
        self.inbox = inbox
        self.ocfg = ocfg
        self.retries = retries

    def paused(self, state: ShopState, now: datetime, force: bool) -> str | None:
        """Why the shop is not polled now (cancelled, next probe later), or None."""
        if state.cancelled and not force and state.next_probe_at and now < state.next_probe_at:
            return f"{CANCELLED} (next probe {state.next_probe_at:%Y-%m-%d %H:%M} UTC)"
        return None

    def window(
        self,
        state: ShopState,
        now: datetime,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> tuple[datetime, datetime]:
        """The poll window: ``[since, until)`` when given, else from the watermark to now."""
        start = (
            naive(since)
            if since
            else (
                state.watermark - timedelta(seconds=self.ocfg.overlap)
                if state.watermark
                else now - timedelta(hours=self.ocfg.first_lookback_hours)
            )
        )
        return start, naive(until) if until else now

    def sweep_due(self, state: ShopState, now: datetime) -> bool:
        return state.last_reconcile_at is None or now - state.last_reconcile_at >= timedelta(
            hours=self.ocfg.reconcile_interval_hours
        )

    def sweep_window(self, now: datetime) -> tuple[datetime, datetime]:
        return now - timedelta(days=self.ocfg.reconcile_days), now

    def download(
        self,
        shop: str,
        connector: ShopConnector,
        since: datetime,
        until: datetime,
        source: str,
        now: datetime,
        result: CycleResult,
        seen: set[str],
    ) -> None:
        """Record every order the shop changed in ``[since, until)`` in the inbox."""

        def fetch() -> None:
            page: list[ShopOrder] = []

            def flush() -> None:
                # One staging transaction per page of orders: the inbox commit is the durable
                # point, and batching it keeps a large catch-up download fast. The source hears
                # "done" for exactly this page, and only after that commit.
                offered = self.inbox.receive(page, source, now, connector.acknowledge)
                for order, o in zip(page, offered, strict=True):
                    if order.e_number not in seen:
                        seen.add(order.e_number)
                        result.total += 1
                        _note_arrival(o, result)
                page.clear()

            window = (since.replace(tzinfo=UTC), until.replace(tzinfo=UTC))
            # closing(): a failed page ends the fetch at once, so the source takes back what it
            # handed out and not acknowledged (the retry below is offered it again).
            with closing(_as_generator(connector.fetch_orders(*window))) as orders:
                for order in orders:
                    page.append(order)
                    if len(page) >= PAGE:
                        flush()
                flush()

        # The inbox de-duplicates, so re-running a partly done fetch after a retry is harmless.
        def retry_on(e: BaseException) -> bool:
            # A Retry-After longer than our backoff ceiling is honoured by ending the cycle
            # (it counts as failed) instead of blocking the daemon in place.
            hint = getattr(e, "retry_after", None) or 0
            return (
                isinstance(e, RetryableError) or is_retryable(e)
            ) and hint <= self.ocfg.backoff_max

        self.retries.retrying(retry_on)(fetch)

    def advance(
        self, state: ShopState, start: datetime, end: datetime, now: datetime, swept: bool
    ) -> None:
        """The window ``[start, end)`` is committed: move the watermark, reset the failures."""
        watermark = state.watermark
        covers = state.watermark is None or start <= state.watermark
        if covers and (watermark is None or end > watermark):
            watermark = end
        self.ledger.save_shop(
            replace(
                state,
                watermark=watermark,
                last_success_at=now,
                consecutive_failures=0,
                cancelled=False,
                cancelled_reason=None,
                next_probe_at=None,
                last_error=None,
                last_reconcile_at=now if swept else state.last_reconcile_at,
            )
        )

    def recovered(self, state: ShopState, now: datetime) -> None:
        """A shop without polling worked off its inbox: clear a failure count or cancellation."""
        if state.consecutive_failures or state.cancelled:
            self.ledger.save_shop(
                replace(
                    state,
                    consecutive_failures=0,
                    cancelled=False,
                    cancelled_reason=None,
                    next_probe_at=None,
                    last_error=None,
                    last_success_at=now,
                )
            )

    def failed(
        self, shop: str, state: ShopState, now: datetime, exc: BaseException, result: CycleResult
    ) -> None:
        """The shop's cycle failed: count it; cancel the shop's import after too many."""
        msg = db_message(exc) if isinstance(exc, sa.exc.SQLAlchemyError) else str(exc)
        failures = state.consecutive_failures + 1
        cancelled = failures >= self.ocfg.max_consecutive_failures
        probe = now + timedelta(minutes=self.ocfg.probe_interval_minutes) if cancelled else None
        self.ledger.save_shop(
            replace(
                state,
                consecutive_failures=failures,
                last_error=msg[:500],
                cancelled=cancelled,
                cancelled_reason=f"{CANCELLED} ({failures}); last: {msg[:200]}"
                if cancelled
                else None,
                next_probe_at=probe,
            )
        )
        if cancelled:
            log.error("order_import_cancelled", shop=shop, consecutive_failures=failures, error=msg)
            result.shops[shop] = f"{CANCELLED} ({failures}): {msg}"
        else:
            log.warning("order_cycle_failed", shop=shop, consecutive_failures=failures, error=msg)
            result.shops[shop] = f"failed ({failures} in a row): {msg}"


def restarted(state: ShopState) -> ShopState:
    """The state of a cancelled shop restarted by the operator: polled on the next cycle."""
    return replace(
        state, cancelled=False, cancelled_reason=None, next_probe_at=None, consecutive_failures=0
    )


def _note_arrival(offered: Offered, result: CycleResult) -> None:
    # An order seen again unchanged has no new fate: not logged, counted or re-checked (that
    # made skipped orders flicker to awaiting and log a line every cycle). A change of the order
    # goes through the inbox ("changed"); of the criteria, the coordinator's recheck.
    if offered.outcome == "same":
        result.unchanged += 1
