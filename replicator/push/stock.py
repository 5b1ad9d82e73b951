"""Stock push: the quantity to publish per SKU, from captured changes of the ERP's stock table(s),
to every shop — within seconds of the ERP commit, coalesced, rate-limited, never lost.

What is published (absolute quantities, never deltas, so a replay is harmless): per SKU, the sum
over its rows in the configured tables (optionally only some warehouses) of on-hand - reserved,
minus quantities on webshop orders not yet imported into the ERP (read from the order ledger when
``subtract_unimported_orders``), minus a safety buffer, never below 0. Excluded SKUs are never
pushed.

The cycle (:meth:`StockPushService.run_cycle`):

1. read new change-journal entries of the stock tables and turn each into the SKU(s) it touches
   (from the key, or the mirror row; a truncate, or a delete whose SKU is no longer known, makes
   the pusher diff every SKU against what it last pushed — a local query, no shop requests);
2. mark those SKUs dirty per shop, remembering when each was first seen and the oldest journal
   entry behind it;
3. for each shop, take the SKUs whose coalescing window has passed (``coalesce_seconds``; 0 =
   at once), compute their quantities *now* from the mirror (so an hour of changes becomes one
   update with the latest value), drop those equal to the quantity last pushed to that shop
   (``push_stock_pushed``), and push the rest in batches through the shop's token bucket;
4. after the shop accepted a batch, record the pushed quantities and clear the SKUs;
5. move the pusher's journal cursor to just before the oldest entry whose SKU is still dirty in
   any shop.

Why nothing is lost: the cursor never passes an entry whose SKU some shop has not accepted yet.
A shop that is down (5xx, timeouts) or throttling (429, ``Retry-After`` honoured by pausing its
bucket) keeps its SKUs dirty and holds the cursor; a crash forgets only the in-memory dirty set,
and the restart re-reads from the cursor. When the shop is back, each dirty SKU is pushed once,
with its latest value.

The full reconcile (:meth:`StockPushService.reconcile`, on ``reconcile_schedule``) reads every
SKU's quantity from each shop, compares with the ERP and corrects the drift.

Wiring (for ``replicator/daemon.py``; the pusher runs in its own thread because a push to a
slow shop, or a reconcile of 10,000 SKUs, can take minutes)::

    from replicator.connectors import make_connector
    from replicator.push.stock import StockPushService

    if cfg.stock_push is not None and cfg.stock_push.enabled:
        connectors = {s.name: make_connector(s, cfg.resolve_path(".")) for s in cfg.shops}
        stock = StockPushService(cfg, store, connectors)
        threading.Thread(target=stock.run_forever, args=(stop_event,), name="push-stock",
                         daemon=True).start()
        # status: stock.progress ("Updating product 825 of 12403 (webshop)" / "idle"),
        #         stock.status() (dict: dirty SKUs, cursor, last cycle/reconcile summaries)
        ...
        stock.close()   # in the daemon's finally, after stop_event.set() and join()

``run_forever`` calls ``run_cycle()`` every ``interval`` seconds and ``reconcile()`` when the
schedule is due; the loop may instead call both itself.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog

from replicator import metrics
from replicator.config import Config
from replicator.config.push import StockPushSection
from replicator.connectors.base import ShopConnector, ShopError, ShopUnavailable, StockUpdate
from replicator.errors import RetryableError
from replicator.push.common import (
    ErpReads,
    ProgressReporter,
    ShopGate,
    SkuFilter,
    push_section,
    select_connectors,
    utcnow_text,
)
from replicator.push.levels import StockLevels
from replicator.schedules import Schedule
from replicator.staging import StagingStore
from replicator.staging.push import PushedStock

log = structlog.get_logger(__name__)

CONSUMER = "push:stock"
_NO_ENTRY = sys.maxsize  # a dirty SKU not backed by a journal entry (webhook retry)


@dataclass
class ShopPush:
    """What one push to one shop did."""

    pushed: int = 0
    refused: list[str] = field(default_factory=list)
    unchanged: int = 0
    error: str | None = None


@dataclass
class RefreshResult:
    """What an ERP webhook's immediate refresh of one SKU did."""

    found: bool
    quantity: int | None = None
    excluded: bool = False
    shops: dict[str, ShopPush] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.found and all(r.error is None for r in self.shops.values())


class StockPushService(ErpReads):
    """Pushes stock levels from the staging store's change journal to the shops."""

    pusher = "stock"

    def __init__(
        self,
        cfg: Config | StockPushSection,
        store: StagingStore,
        connectors: Mapping[str, ShopConnector] | Iterable[ShopConnector],
        *,
        clock: Callable[[], float] = time.monotonic,
        erp_url: str | None = None,
        on_progress: Callable[[str], None] | None = None,
        consumer: str = CONSUMER,
    ) -> None:
        section, self._erp_url = push_section(cfg, StockPushSection, "stock_push", erp_url)
        self.cfg = section
        self.store = store
        self.clock = clock
        self.connectors = select_connectors(connectors, section.shops)
        self.gates = {
            name: ShopGate(name, section.rate_limit, section.burst, section.max_backoff, clock)
            for name in self.connectors
        }
        self.filter = SkuFilter(section.exclude_skus)
        self.reader = store.journal_reader(consumer, section.tables)
        self.schedule = Schedule.parse(section.reconcile_schedule, "stock_push.reconcile_schedule")
        self._progress = ProgressReporter("stock", section.progress_log_seconds, clock, on_progress)
        self._lock = threading.RLock()  # the dirty set
        # shop -> sku -> (first seen on the clock, oldest journal id behind it)
        self._dirty: dict[str, dict[str, tuple[float, int]]] = {n: {} for n in self.connectors}
        self._erp_engine: sa.Engine | None = None
        self._next_reconcile: dt.datetime | None = None
        self.last_cycle: dict[str, Any] = {}
        self.last_reconcile: dict[str, Any] = {}
        self._pushed = PushedStock(store.db)
        self.levels = StockLevels(section, store, self.filter, self._erp)

    # ------------------------------------------------------------------ state
    @property
    def progress(self) -> str:
        """ "Updating product 825 of 12403 (webshop)" while pushing, "idle" otherwise."""
        return self._progress.text

    def status(self) -> dict[str, Any]:
        """For ``sync-daemon status``: progress, backlog, cursor, shop back-off, last summaries."""
        with self._lock:
            dirty = {s: len(d) for s, d in self._dirty.items()}
        return {
            "progress": self.progress,
            "dirty_skus": dirty,
            "cursor": self.reader.committed,
            "shops": {
                n: {
                    "failures": g.failures,
                    "last_error": g.last_error,
                    "retry_in_seconds": round(max(0.0, g.blocked_until - self.clock()), 1),
                }
                for n, g in self.gates.items()
            },
            "last_cycle": self.last_cycle,
            "last_reconcile": self.last_reconcile,
            "next_reconcile": self._next_reconcile.isoformat() if self._next_reconcile else None,
        }

    def pushed(self, shop: str) -> dict[str, int]:
        """SKU → quantity last accepted by ``shop`` (what the pusher believes the shop has)."""
        return self._pushed.of_shop(shop)

    def _pushed_for(self, shop: str, skus: Sequence[str]) -> dict[str, int]:
        return self._pushed.of_shop(shop, skus)

    def _record(
        self, shop: str, quantities: Mapping[str, int], refused: Iterable[str] = ()
    ) -> None:
        """Remember what ``shop`` accepted (refused SKUs too: not retried until they change)."""
        if quantities:
            self._pushed.record(shop, quantities, refused, utcnow_text())

    # ------------------------------------------------------------------ dirty SKUs
    def _mark(
        self, skus: Mapping[str, int], now: float, shops: Iterable[str] | None = None
    ) -> None:
        with self._lock:
            for shop in shops if shops is not None else self.connectors:
                dirty = self._dirty[shop]
                for sku, jid in skus.items():
                    if self.filter.excluded(sku):
                        continue
                    prev = dirty.get(sku)
                    dirty[sku] = (now, jid) if prev is None else (prev[0], min(prev[1], jid))

    def _local_diff(self, jid: int, now: float) -> int:
        """Mark every SKU whose quantity differs from what was last pushed (no shop requests)."""
        current = self.levels.quantities(None)
        marked = 0
        for shop in self.connectors:
            pushed = self.pushed(shop)
            changed = {
                s: jid
                for s in set(current) | set(pushed)
                if current.get(s, 0) != pushed.get(s) and not self.filter.excluded(s)
            }
            self._mark(changed, now, [shop])
            marked += len(changed)
        return marked

    # ------------------------------------------------------------------ pushing
    def _push(
        self,
        shop: str,
        quantities: Mapping[str, int],
        *,
        label: str,
        stop: threading.Event | None = None,
        max_wait: float | None = None,
        total: int | None = None,
        offset: int = 0,
    ) -> ShopPush:
        """Push ``quantities`` to ``shop`` in batches; record each batch the shop accepted."""
        result = ShopPush()
        conn = self.connectors[shop]
        gate = self.gates[shop]
        items = list(quantities.items())
        n = total if total is not None else len(items)
        size = self.cfg.batch_size
        for i in range(0, len(items), size):
            chunk = dict(items[i : i + size])
            if not gate.bucket.acquire(max_wait=max_wait, stop=stop):
                result.error = "rate limit: no request budget left in this cycle"
                break
            done = min(offset + i + len(chunk), n)
            self._progress.set(f"Updating product {done} of {n} ({shop}, {label})")
            try:
                with gate.lock:
                    refused = conn.push_stock([StockUpdate(s, q) for s, q in chunk.items()])
            except (ShopUnavailable, RetryableError) as exc:
                retry_after = getattr(exc, "retry_after", None)
                wait = gate.failed(str(exc), retry_after)
                result.error = str(exc)
                log.warning(
                    "stock_push_shop_unavailable",
                    shop=shop,
                    error=str(exc),
                    retry_in_seconds=round(wait, 1),
                    pending=len(items) - i,
                )
                break
            except ShopError as exc:
                wait = gate.failed(str(exc), None)
                result.error = str(exc)
                log.error(
                    "stock_push_refused_by_shop",
                    shop=shop,
                    error=str(exc),
                    retry_in_seconds=round(wait, 1),
                )
                break
            gate.ok()
            self._record(shop, chunk, refused)
            with self._lock:
                dirty = self._dirty.get(shop, {})
                for s in chunk:
                    dirty.pop(s, None)
            result.pushed += len(chunk) - len(refused)
            result.refused.extend(refused)
        return result

    def run_cycle(
        self,
        now: float | None = None,
        stop: threading.Event | None = None,
        *,
        ignore_window: bool = False,
    ) -> dict[str, Any]:
        """Read new journal entries, push the SKUs whose window has passed, move the cursor.

        ``now`` is a reading of the service's clock (default: read it); ``ignore_window`` pushes
        every dirty SKU regardless of the coalescing window (shutdown, tests).
        """
        now = self.clock() if now is None else now
        started = time.monotonic()
        entries = self.reader.read(self.cfg.journal_batch)
        skus, full = self.levels.skus_of(entries)
        self._mark(skus, now)
        diffed = 0
        if full:
            first_full = next(
                (e["id"] for e in entries if e["op"] == "T" or e["key"] is None), entries[0]["id"]
            )
            diffed = self._local_diff(min([first_full, *skus.values()]), now)
        summary: dict[str, Any] = {"read": len(entries), "skus_changed": len(skus)}
        if full:
            summary["full_diff_marked"] = diffed
        shops: dict[str, Any] = {}
        window = self.cfg.coalesce_seconds
        for shop, gate in self.gates.items():
            with self._lock:
                due = [
                    s
                    for s, (first, _) in self._dirty[shop].items()
                    if ignore_window or now - first >= window
                ]
            if not due or gate.blocked(self.clock()):
                continue
            with self._lock:
                dirty = self._dirty[shop]
                from_erp = [s for s in due if dirty.get(s, (0.0, 0))[1] == _NO_ENTRY]
            want = self.levels.quantities([s for s in due if s not in set(from_erp)])
            if from_erp:  # webhook refreshes the shop did not take: read the ERP again
                try:
                    erp_now = self.levels.from_erp(from_erp)
                except sa.exc.SQLAlchemyError as exc:
                    log.warning("stock_erp_read_failed", error=str(exc).splitlines()[0])
                    erp_now = None
                if erp_now is None:
                    erp_now = {}
                else:
                    with self._lock:
                        for s in from_erp:
                            if s not in erp_now:  # no rows in the ERP any more
                                self._dirty[shop].pop(s, None)
                want.update((s, q) for s, q in erp_now.items() if not self.filter.excluded(s))
                due = [s for s in due if s not in set(from_erp) or s in erp_now]
            last = self._pushed_for(shop, due)
            changed = {s: q for s, q in want.items() if last.get(s) != q}
            with self._lock:
                for s in due:
                    if s not in changed:
                        self._dirty[shop].pop(s, None)  # unchanged (or excluded): nothing to do
            res = ShopPush(unchanged=len(due) - len(changed))
            if changed:
                # Inside a cycle, do not sit out a long rate-limit wait: what is left stays dirty.
                pushed = self._push(shop, changed, label="changes", stop=stop, max_wait=5.0)
                res.pushed, res.refused, res.error = pushed.pushed, pushed.refused, pushed.error
            shops[shop] = {
                "due": len(due),
                "pushed": res.pushed,
                "unchanged": res.unchanged,
                "refused": len(res.refused),
                **({"error": res.error} if res.error else {}),
            }
        if shops:
            summary["shops"] = shops
        summary["cursor"] = self._advance_cursor()
        with self._lock:
            pending = sum(len(d) for d in self._dirty.values())
            oldest = min((f for d in self._dirty.values() for f, _ in d.values()), default=None)
        summary["pending"] = pending
        metrics.PUSH_LAG_SECONDS.labels(pusher="stock").set(
            0.0 if oldest is None else max(0.0, self.clock() - oldest)
        )
        self._progress.idle()
        if entries or shops:
            summary["seconds"] = round(time.monotonic() - started, 3)
            log.info("stock_push_cycle", **summary)
        self.last_cycle = summary
        return summary

    def _advance_cursor(self) -> int:
        with self._lock:
            held = min(
                (jid for d in self._dirty.values() for _, jid in d.values() if jid != _NO_ENTRY),
                default=None,
            )
        target = self.reader.read_upto if held is None else min(held - 1, self.reader.read_upto)
        self.reader.commit(target)
        return self.reader.committed

    def flush(self, timeout: float = 30.0, stop: threading.Event | None = None) -> dict[str, Any]:
        """Run cycles with the window ignored until nothing is pending (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        summary: dict[str, Any] = {}
        while time.monotonic() < deadline:
            summary = self.run_cycle(stop=stop, ignore_window=True)
            if summary["pending"] == 0 and summary["read"] == 0:
                break
            time.sleep(0.05)
        return summary

    # ------------------------------------------------------------------ reconcile
    def reconcile_due(self, now: dt.datetime | None = None) -> bool:
        """Whether the scheduled full reconcile should run (first slot after start)."""
        now = now or dt.datetime.now().astimezone()
        if self._next_reconcile is None:
            self._next_reconcile = self.schedule.next_after(now)
        return self._next_reconcile is not None and now >= self._next_reconcile

    def reconcile(
        self, now: dt.datetime | None = None, stop: threading.Event | None = None
    ) -> dict[str, Any]:
        """Compare every SKU's quantity in each shop with the ERP and correct the drift."""
        started = time.monotonic()
        now = now or dt.datetime.now().astimezone()
        self._next_reconcile = self.schedule.next_after(now)
        self._progress.set("Reconcile: computing ERP quantities", force_log=True)
        erp = self.levels.quantities(None)
        summary: dict[str, Any] = {"erp_skus": len(erp), "shops": {}}
        for shop, conn in self.connectors.items():
            out: dict[str, Any] = {}
            summary["shops"][shop] = out
            gate = self.gates[shop]
            self._progress.set(f"Reconcile: reading stock from {shop}", force_log=True)
            in_shop: dict[str, int] = {}
            try:
                for i, u in enumerate(conn.fetch_stock(), 1):
                    in_shop[u.sku] = u.quantity
                    if i % 1000 == 0:
                        self._progress.set(f"Reconcile: read {i} products from {shop}")
            except (ShopUnavailable, RetryableError, ShopError) as exc:
                gate.failed(str(exc), getattr(exc, "retry_after", None))
                out["error"] = str(exc)
                log.warning("stock_reconcile_failed", shop=shop, error=str(exc))
                continue
            gate.ok()
            drift = {s: erp[s] for s, q in in_shop.items() if s in erp and q != erp[s]}
            same = {s: q for s, q in in_shop.items() if s in erp and s not in drift}
            self._record(shop, same)  # what the shop has is now known
            with self._lock:
                for s in same:
                    self._dirty[shop].pop(s, None)
            out.update(
                checked=len(in_shop),
                differed=len(drift),
                not_in_erp=sum(1 for s in in_shop if s not in erp and not self.filter.excluded(s)),
            )
            if drift:
                log.info(
                    "stock_reconcile_drift",
                    shop=shop,
                    differed=len(drift),
                    examples={s: [in_shop[s], q] for s, q in list(drift.items())[:5]},
                )
                res = self._push(shop, drift, label="reconcile", stop=stop)
                out.update(corrected=res.pushed, refused=len(res.refused))
                if res.error:
                    out["error"] = res.error
            else:
                out["corrected"] = 0
        summary["seconds"] = round(time.monotonic() - started, 3)
        self._progress.idle()
        log.info("stock_reconcile", **summary)
        self.last_reconcile = summary
        return summary

    # ------------------------------------------------------------------ ERP webhook
    def refresh_sku(self, sku: str) -> RefreshResult:
        """Read one SKU's rows directly from the ERP and push its quantity to every shop now."""
        found = self.levels.from_erp([sku])
        if sku not in found:
            return RefreshResult(found=False)
        if self.filter.excluded(sku):
            return RefreshResult(found=True, excluded=True)
        qty = found[sku]
        result = RefreshResult(found=True, quantity=qty)
        for shop in self.connectors:
            res = self._push(shop, {sku: qty}, label="ERP webhook", max_wait=10.0)
            result.shops[shop] = res
            if res.error:
                # Retried by the cycle (due at once); the captured change will follow anyway.
                self._mark({sku: _NO_ENTRY}, self.clock() - self.cfg.coalesce_seconds, [shop])
        self._progress.idle()
        log.info(
            "stock_refreshed_by_erp_webhook",
            sku=sku,
            quantity=qty,
            shops={s: r.error or "ok" for s, r in result.shops.items()},
        )
        return result

    # ------------------------------------------------------------------ running
    def run_forever(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Cycle until ``stop`` is set; reconcile on schedule. Errors are logged, never raised."""
        while not stop.is_set():
            try:
                self.run_cycle(stop=stop)
                if self.reconcile_due():
                    self.reconcile(stop=stop)
            except Exception as exc:  # the pusher must outlive a bad cycle
                log.exception("stock_push_cycle_failed", error=str(exc))
                stop.wait(5.0)
            stop.wait(interval)
