"""Operator actions on orders, and the updates queue.

What ``sync-daemon accept / ignore / cancel / retry / download`` and the Manage page's buttons
call: each finds the order in the ledger, acts on the ERP through the shop's writer where needed
and records what it did in the ledger (state and timeline) in one staging transaction.

A changed order already in the ERP (``update-pending``) is applied by the import cycle when
``orders.auto_apply_updates`` allows it and the ERP order is not posted
(:meth:`OrderActions.apply_update`); otherwise it is queued here for an operator to accept or
ignore.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa

from replicator.config.orders import OrdersSection
from replicator.errors import FatalError
from replicator.errors_map import is_retryable
from replicator.mappers.orders import OrderRejected
from replicator.orders.inbox import PayloadError, parse_payload
from replicator.orders.ledger import Entry, Ledger
from replicator.orders.mappings import AnyWriter, MappingStore
from replicator.orders.polling import restarted
from replicator.orders.results import CycleResult, utcnow
from replicator.orders.retry import RetryPolicy
from replicator.orders.writer import NotInErp, OrderPosted, WriteResult

# Import one order now (shop, e-number, time) -> its ledger entry afterwards.
ProcessOne = Callable[[str, str, datetime], Entry | None]


class OrderActions:
    """Operator actions on the ledger's orders (and what the Manage page's dry run reads:
    ``writer_for``, ``ocfg``, ``engine``)."""

    def __init__(
        self,
        ledger: Ledger,
        mappings: MappingStore,
        ocfg: OrdersSection,
        engine: sa.Engine,
        retries: RetryPolicy,
        process: ProcessOne,
    ) -> None:
        self.ledger = ledger
        self.mappings = mappings
        self.ocfg = ocfg
        self.engine = engine
        self.retries = retries
        self._process = process

    def writer_for(self, shop: str) -> AnyWriter:
        return self.mappings.writer_for(shop)

    def find_one(self, e: str, shop: str | None) -> Entry:
        found = self.ledger.find(e, shop)
        if not found:
            raise FatalError(
                f"no order {e!r} in the ledger" + (f" for shop {shop!r}" if shop else "")
            )
        if len(found) > 1:
            raise FatalError(
                f"e-number {e!r} exists in shops {', '.join(x.shop for x in found)}; use --shop"
            )
        return found[0]

    # -- operator actions -----------------------------------------------------------------------

    def accept(self, e: str, shop: str | None = None, force: bool = False) -> WriteResult:
        entry = self.find_one(e, shop)
        if entry.state != "update-pending" or entry.pending_payload is None:
            raise FatalError(f"order {e} has no pending update (state {entry.state})")
        now = utcnow()
        try:
            return self._replace(entry, force=force, now=now, how="accepted")
        except OrderPosted as exc:
            with self.ledger.begin() as conn:
                self.ledger.event(conn, entry.shop, e, now, "accept refused", str(exc))
            raise FatalError(str(exc)) from None
        except (OrderRejected, PayloadError) as exc:
            with self.ledger.begin() as conn:
                self.ledger.event(conn, entry.shop, e, now, "accept failed", str(exc))
            raise FatalError(f"cannot apply the update: {exc}") from None

    def ignore(self, e: str, shop: str | None = None) -> None:
        entry = self.find_one(e, shop)
        if entry.state != "update-pending":
            raise FatalError(f"order {e} has no pending update (state {entry.state})")
        # pending_hash stays: the same version arriving again is then recognised as known.
        self._settle(
            entry, "update ignored", "the ERP order keeps the imported version", last_error=None
        )

    def cancel(self, e: str, shop: str | None = None) -> str:
        entry = self.find_one(e, shop)
        if entry.erp_order_no is None:
            raise FatalError(f"order {e} is not in the ERP (state {entry.state})")
        order_no = self.writer_for(entry.shop).cancel(e)
        self._settle(entry, "cancelled", f"ERP order {order_no} marked cancelled")
        return order_no

    def _settle(self, entry: Entry, what: str, detail: str, **fields: object) -> None:
        """Close an operator action on an order the ERP holds: ``delivered``, no pending update
        left, and the event on its timeline, in one ledger transaction (``fields``: more
        columns to set)."""
        with self.ledger.begin() as conn:
            self.ledger.update(
                conn,
                entry.shop,
                entry.e_number,
                state="delivered",
                pending_payload=None,
                update_queued=False,
                diff=None,
                **fields,
            )
            self.ledger.event(conn, entry.shop, entry.e_number, utcnow(), what, detail)

    def retry(self, e: str, shop: str | None = None) -> Entry | None:
        entry = self.find_one(e, shop)
        if entry.state in ("delivered", "update-pending"):
            raise FatalError(
                f"order {e} is {entry.state} (ERP order {entry.erp_order_no}); nothing to retry"
            )
        now = utcnow()
        with self.ledger.begin() as conn:
            self.ledger.update(
                conn, entry.shop, e, state="awaiting", attempts=0, next_attempt_at=None
            )
            self.ledger.event(conn, entry.shop, e, now, "retry requested", f"was {entry.state}")
        return self._process(entry.shop, e, now)

    def restart_shop(self, shop: str) -> None:
        """Restart a shop whose import was cancelled after too many errors."""
        self.ledger.save_shop(restarted(self.ledger.shop_state(shop)))

    # -- the updates queue ----------------------------------------------------------------------

    def apply_update(self, shop: str, e: str, now: datetime, result: CycleResult) -> None:
        """The cycle's path for an ``update-pending`` order: applied when allowed, else queued."""
        entry = self.ledger.get(shop, e)
        if entry is None or entry.state != "update-pending" or entry.pending_payload is None:
            return
        if not self.ocfg.auto_apply_updates:
            self._queue_update(
                shop, e, now, "waiting for sync-daemon accept (auto_apply_updates = false)"
            )
            return
        writer = self.writer_for(shop)
        with self.engine.connect() as conn:
            posted = writer.is_posted(conn, e)
        if posted:
            self._queue_update(
                shop,
                e,
                now,
                f"ERP order {entry.erp_order_no} is posted; accept with --force or ignore",
            )
            return
        try:
            self._replace(entry, force=False, now=now, how="applied automatically")
            result.updated += 1
        except (OrderRejected, PayloadError, OrderPosted, NotInErp) as exc:
            self._queue_update(shop, e, now, f"cannot apply automatically: {exc}")

    def _queue_update(self, shop: str, e: str, now: datetime, why: str) -> None:
        with self.ledger.begin() as conn:
            self.ledger.update(conn, shop, e, update_queued=True, last_error=why)
            self.ledger.event(conn, shop, e, now, "update queued", why)

    def _replace(self, entry: Entry, *, force: bool, now: datetime, how: str) -> WriteResult:
        assert entry.pending_payload is not None
        payload = parse_payload(entry.pending_payload)
        crit = self.ocfg.criteria_for(entry.shop)
        res = self.retries.retrying(is_retryable)(
            self.writer_for(entry.shop).replace,
            entry.shop,
            entry.e_number,
            payload,
            force=force,
            auto_invoice=crit.mode == "auto_invoice",
        )
        with self.ledger.begin() as conn:
            self.ledger.update(
                conn,
                entry.shop,
                entry.e_number,
                state="delivered",
                payload=entry.pending_payload,
                payload_hash=entry.pending_hash,
                pending_payload=None,
                pending_hash=None,
                diff=None,
                update_queued=False,
                last_error=None,
                erp_order_no=res.order_number,
            )
            self.ledger.event(
                conn,
                entry.shop,
                entry.e_number,
                now,
                "accepted",
                f"update {how}: ERP order {res.order_number} replaced, {res.lines} line(s)"
                + (" (forced over a posted ERP order)" if force else ""),
            )
        return res
