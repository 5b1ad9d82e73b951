"""Importing orders from the ledger into the ERP, a batch at a time.

:class:`BatchImporter` takes due orders of one shop from the ledger, decides each
(:func:`replicator.orders.decision.decide`), does the ERP write the decision calls for on
``orders.workers`` threads — each order in its own ERP transaction, one ERP connection per worker
for its share — and records the whole batch's outcomes in one staging transaction afterwards. A
crash in between leaves those orders ``awaiting``; the next run finds their e-numbers in the ERP
and records them (no second ERP order). An ERP outage ends the batch: the orders it hit wait with
a retry time, and :class:`~replicator.orders.writer.ErpUnavailable` tells the caller.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import sqlalchemy as sa
import structlog

from replicator.config.orders import ImportCriteria, OrdersSection
from replicator.orders.decision import Outcome, Write, decide, unforeseen, write_failed, written
from replicator.orders.ledger import Entry, Ledger
from replicator.orders.mappings import AnyWriter, MappingStore
from replicator.orders.results import CycleResult, utcnow
from replicator.orders.retry import RetryPolicy
from replicator.orders.writer import ErpUnavailable, WriteResult

log = structlog.get_logger(__name__)

BATCH = 200  # due orders read from the ledger, written, and recorded together


class BatchImporter:
    """Decides, writes and records orders of the ledger, on a pool of ``orders.workers``."""

    def __init__(
        self, ledger: Ledger, mappings: MappingStore, ocfg: OrdersSection, retries: RetryPolicy
    ) -> None:
        self.ledger = ledger
        self.mappings = mappings
        self.ocfg = ocfg
        self.retries = retries
        self._executor: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _pool(self) -> ThreadPoolExecutor | None:
        if self.ocfg.workers <= 1:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.ocfg.workers, thread_name_prefix="order-import"
            )
        return self._executor

    def import_batch(self, shop: str, es: list[str], now: datetime, result: CycleResult) -> None:
        """Import the orders ``es`` of the shop: decided and written on the worker pool, their
        outcomes recorded in one staging transaction; raises ErpUnavailable (after recording)
        when the ERP could not take one."""
        entries = self.ledger.get_many(shop, es)
        writer = self.mappings.writer_for(shop)
        crit = self.ocfg.criteria_for(shop)

        def chunk(part: list[Entry]) -> list[Outcome]:
            # One ERP connection per worker for its share of the batch (no pool checkout and
            # liveness ping per order); each order is still its own ERP transaction.
            conn: sa.Connection | None
            try:
                conn = writer.engine.connect()
            except sa.exc.DBAPIError:
                conn = None  # each order then meets the outage itself and is retried later
            out = []
            try:
                for entry in part:
                    o = self._import_one(entry, now, writer, crit, conn)
                    if o.transient and conn is not None:
                        # The link may be broken: later orders take fresh connections.
                        conn.close()
                        conn = None
                    out.append(o)
            finally:
                if conn is not None:
                    conn.close()
            return out

        pool = self._pool()
        n = self.ocfg.workers if pool and len(entries) > 1 else 1
        parts = [entries[i::n] for i in range(n)]
        results = list(pool.map(chunk, parts)) if pool and n > 1 else [chunk(entries)]
        by_key = {(o.shop, o.e_number): o for part in results for o in part}
        outcomes = [by_key[(x.shop, x.e_number)] for x in entries]
        with self.ledger.begin() as conn:
            self.ledger.update_many(
                conn, [(o.shop, o.e_number, o.values) for o in outcomes if o.values]
            )
            self.ledger.events_many(
                conn,
                [
                    {
                        "shop": o.shop,
                        "e_number": o.e_number,
                        "at": now,
                        "event": o.event[0],
                        "detail": o.event[1],
                    }
                    for o in outcomes
                    if o.event is not None
                ],
            )
        for o in outcomes:
            _count(o, result)
        transient = [o.transient for o in outcomes if o.transient]
        if transient:
            raise ErpUnavailable(f"ERP unavailable: {transient[0]}")

    def process(
        self, shop: str, e: str, now: datetime | None = None, result: CycleResult | None = None
    ) -> Entry | None:
        """Import one order now (awaiting, failed or skipped). Transient ERP trouble raises
        ErpUnavailable after the in-place retries (the order stays awaiting, with a retry time)."""
        now = now or utcnow()
        entry = self.ledger.get(shop, e)
        if entry is None or entry.state not in ("awaiting", "failed", "skipped"):
            return entry
        writer = self.mappings.writer_for(shop)
        o = self._import_one(entry, now, writer, self.ocfg.criteria_for(shop))
        with self.ledger.begin() as conn:
            if o.values:
                self.ledger.update(conn, o.shop, o.e_number, **o.values)
            if o.event is not None:
                self.ledger.event(conn, o.shop, o.e_number, now, o.event[0], o.event[1])
        if result is not None:
            _count(o, result)
        if o.transient:
            raise ErpUnavailable(f"ERP unavailable: {o.transient}")
        return self.ledger.get(shop, e)

    def _import_one(
        self,
        entry: Entry,
        now: datetime,
        writer: AnyWriter,
        crit: ImportCriteria,
        conn: sa.Connection | None = None,
    ) -> Outcome:
        """Decide one order and do the ERP write it calls for; no ledger writes (the caller
        records the outcome), so it runs on a worker thread."""
        step = decide(entry, crit, self.ocfg, writer.m.hash)
        if isinstance(step, Write):
            try:
                res: WriteResult = self.retries.write(
                    writer.write,
                    entry.shop,
                    entry.e_number,
                    step.payload,
                    auto_invoice=step.auto_invoice,
                    conn=conn,
                )
            except Exception as exc:
                if unforeseen(exc):
                    log.exception("order_import_error", shop=entry.shop, e_number=entry.e_number)
                o = write_failed(entry, exc, now, self.ocfg, writer.m.hash)
            else:
                o = written(entry, res, utcnow())
        else:
            o = step
        if o.unfit is not None:
            # Re-validate the mapping before the next order.
            self.mappings.mark_unfit(writer.m.path, o.unfit)
        _log(o)
        return o


def _count(o: Outcome, result: CycleResult) -> None:
    if o.note is None:
        return
    kind, reason = o.note
    if kind == "new":
        result.new += 1
    elif kind == "skip":
        result.skip(o.shop, o.e_number, reason)
    else:
        result.error(o.shop, o.e_number, reason)


def _log(o: Outcome) -> None:
    """The log line of an order's fate (the decision itself does not log)."""
    if o.event is None:
        return
    event, v = o.event[0], o.values
    if event == "failed":
        log.warning(
            "order_failed",
            shop=o.shop,
            e_number=o.e_number,
            reason=v["last_error"],
            kind=v["error_kind"],
        )
    elif event == "skipped":
        log.info("order_skipped", shop=o.shop, e_number=o.e_number, reason=v["last_error"])
    elif event == "retry later":
        log.warning("order_retry_later", shop=o.shop, e_number=o.e_number, error=o.transient)
    else:
        log.info(
            "order_imported",
            shop=o.shop,
            e_number=o.e_number,
            order_number=v["erp_order_no"],
            created=event == "written",
        )
