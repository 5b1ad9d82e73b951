"""The order import, wired: download → inbox → decision → write once → ledger.

:class:`OrderImportService` is what the daemon loop drives (``run_cycle(now)`` on the
``[schedules] orders`` schedule), what webhook receivers store into and what the CLI commands
open. It owns no rule of its own; it puts the parts together:

- :mod:`replicator.orders.mappings` — every shop's mapping, hot-reloaded (``mappings``);
- :mod:`replicator.orders.polling` — download windows, watermarks, failure counts (``polling``);
- :mod:`replicator.orders.inbox` — the one inbox every arrival is recorded in (``inbox``);
- :mod:`replicator.orders.decision` — what happens to one order (a pure function);
- :mod:`replicator.orders.batch` — deciding, writing and recording due orders on the worker
  pool (``importer``);
- :mod:`replicator.orders.actions` — operator actions and the updates queue (``actions``).

Per shop, a cycle retries orders parked for a mapping that changed, re-checks skipped orders when
the criteria changed, downloads the poll window (and the daily sweep) into the inbox, then works
off the ledger a batch at a time (changed orders go to the updates queue). Only then does the
watermark advance. Webhook deliveries wake a background thread that works
off the shop's inbox at once; one work-off of a shop runs at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.config.orders import ImportCriteria, OrdersSection
from replicator.connectors import make_connectors
from replicator.connectors.base import ShopConnector
from replicator.connectors.webhook import WebhookDelivery
from replicator.db import make_engine
from replicator.errors import SyncError
from replicator.failpoints import failpoint
from replicator.orders.actions import OrderActions
from replicator.orders.batch import BATCH, BatchImporter
from replicator.orders.inbox import Inbox
from replicator.orders.ledger import Ledger
from replicator.orders.mappings import AnyWriter, MappingStore
from replicator.orders.polling import ShopPolling
from replicator.orders.results import CycleResult, naive, utcnow
from replicator.orders.retry import RetryPolicy

log = structlog.get_logger(__name__)


class OrderImportService:
    """Order import for every configured shop; one instance per daemon."""

    def __init__(
        self,
        cfg: Any,
        connectors: Mapping[str, ShopConnector] | None = None,
        *,
        erp_engine: sa.Engine | None = None,
        ledger: Ledger | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.ocfg: OrdersSection = cfg.orders
        self.ledger = ledger or Ledger(cfg.staging_url)
        self.engine = erp_engine or make_engine(cfg.erp.writer_url, "orders")
        self.inbox = Inbox(self.ledger, self.ocfg.e_number_fields)
        self.retries = RetryPolicy(self.ocfg, sleep)
        self.mappings = MappingStore(cfg, self.engine)
        self.polling = ShopPolling(self.ledger, self.inbox, self.ocfg, self.retries)
        self.importer = BatchImporter(self.ledger, self.mappings, self.ocfg, self.retries)
        self.actions = OrderActions(
            self.ledger, self.mappings, self.ocfg, self.engine, self.retries, self.importer.process
        )
        self._connectors: dict[str, ShopConnector] | None = (
            dict(connectors) if connectors is not None else None
        )
        self._criteria_checked: dict[str, ImportCriteria] = {}
        # Shops whose inbox got new orders (webhooks): imported by one background thread.
        self._woken: set[str] = set()
        self._woken_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._waker: threading.Thread | None = None
        # One import of a shop's inbox at a time (the cycle and the woken thread share it).
        self._shop_locks: dict[str, threading.Lock] = {}
        self.mappings.check_all({s.name for s in getattr(cfg, "shops", ())} | set(connectors or {}))

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._waker is not None:
            self._waker.join(timeout=30)
        self.importer.close()
        for c in (self._connectors or {}).values():
            try:
                c.close()
            except Exception:  # closing is best effort
                log.warning("connector_close_failed", shop=getattr(c, "name", "?"))
        self.ledger.close()
        self.engine.dispose()

    @property
    def connectors(self) -> dict[str, ShopConnector]:
        """The shops to poll: those given, else every configured shop there is to reach."""
        if self._connectors is None:
            self._connectors = make_connectors(self.cfg)
        return self._connectors

    def readiness(self) -> tuple[bool, str]:
        """For ``/readyz``: not ready while a mapping no longer fits the ERP."""
        return self.mappings.readiness()

    def writer_for(self, shop: str) -> AnyWriter:
        return self.mappings.writer_for(shop)

    # -- the cycle ------------------------------------------------------------------------------

    def run_cycle(
        self,
        now: datetime | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        force: bool = False,
        shops: Iterable[str] | None = None,
    ) -> CycleResult:
        """One download-and-import cycle over every shop (or ``shops``)."""
        now = naive(now) if now else utcnow()
        result = CycleResult()
        wanted = set(shops) if shops is not None else None
        connectors = self.connectors
        for shop, connector in connectors.items():
            if wanted is not None and shop not in wanted:
                continue
            self._cycle_shop(shop, connector, now, since, until, force, result)
        # Shops without a connector here (webhook-only) still get their inbox worked off, e.g.
        # orders whose fast-path import met an ERP outage.
        for shop in sorted({s.name for s in getattr(self.cfg, "shops", ())} - set(connectors)):
            if wanted is None or shop in wanted:
                self._work_off_only(shop, now, result)
        log.info("order_cycle", summary=result.summary(), shops=result.shops)
        return result

    def _cycle_shop(
        self,
        shop: str,
        connector: ShopConnector,
        now: datetime,
        since: datetime | None,
        until: datetime | None,
        force: bool,
        result: CycleResult,
    ) -> None:
        state = self.ledger.shop_state(shop)
        paused = self.polling.paused(state, now, force)
        if paused is not None:
            result.shops[shop] = paused
            return
        if state.cancelled:
            log.info("order_import_probe" if not force else "order_import_restarted", shop=shop)
        start, end = self.polling.window(state, now, since, until)
        seen: set[str] = set()
        try:
            self.mappings.get(shop)
            seen.update(self._retry_mapping_failures(shop, now))
            self._recheck_skipped(shop, now, result)
            self.polling.download(shop, connector, start, end, "poll", now, result, seen)
            sweep = self.polling.sweep_due(state, now)
            if sweep:
                sweep_since, sweep_until = self.polling.sweep_window(now)
                self.polling.download(
                    shop, connector, sweep_since, sweep_until, "sweep", now, result, seen
                )
            self._work_off(shop, now, result)
        except (SyncError, sa.exc.SQLAlchemyError, OSError) as exc:
            self.polling.failed(shop, state, now, exc, result)
            return
        failpoint("orders.watermark")
        self.polling.advance(state, start, end, now, sweep)
        result.shops[shop] = "ok"

    def _work_off_only(self, shop: str, now: datetime, result: CycleResult) -> None:
        state = self.ledger.shop_state(shop)
        try:
            self.mappings.get(shop)
            self._retry_mapping_failures(shop, now)
            self._recheck_skipped(shop, now, result)
            self._work_off(shop, now, result)
        except (SyncError, sa.exc.SQLAlchemyError, OSError) as exc:
            self.polling.failed(shop, state, now, exc, result)
            return
        self.polling.recovered(state, now)
        result.shops[shop] = "ok"

    def _recheck_skipped(self, shop: str, now: datetime, result: CycleResult) -> None:
        """Decide skipped orders again when the criteria they were judged by may have changed:
        once per service (a config reload builds a new one), in place — never via awaiting."""
        crit = self.ocfg.criteria_for(shop)
        if self._criteria_checked.get(shop) == crit:
            return
        skipped = [e for e, st, _ in self.ledger.e_numbers(shop) if st == "skipped"]
        for i in range(0, len(skipped), BATCH):
            self.importer.import_batch(shop, skipped[i : i + BATCH], now, result)
        self._criteria_checked[shop] = crit

    def _retry_mapping_failures(self, shop: str, now: datetime) -> list[str]:
        """Orders parked for a mapping problem are retried when the mapping files changed."""
        current = self.mappings.get(shop).mapping.hash
        # After the ERP fitted the mapping again every mapping failure is retried ("" matches
        # no mapping hash); otherwise only those parked under other mapping files.
        todo = self.ledger.mapping_failures(shop, "" if self.mappings.refitted(shop) else current)
        self.mappings.refit_done(shop)
        for e in todo:
            with self.ledger.begin() as conn:
                self.ledger.update(conn, shop, e, state="awaiting", next_attempt_at=None)
                self.ledger.event(conn, shop, e, now, "requeued", "mapping files changed; retrying")
        return todo

    # -- working off the inbox ------------------------------------------------------------------

    def work_off(self, shop: str, now: datetime | None = None) -> CycleResult:
        """Import what the inbox holds for ``shop`` now, without downloading (e.g. right after
        webhook deliveries)."""
        result = CycleResult()
        self._work_off(shop, naive(now) if now else utcnow(), result)
        return result

    def _work_off(self, shop: str, now: datetime, result: CycleResult) -> None:
        """Import every due order of the shop: ERP writes run on ``orders.workers`` threads (each
        order in its own ERP transaction); the ledger notes a whole batch in one staging
        transaction afterwards. A crash in between leaves those orders ``awaiting``; the next run
        finds their e-numbers in the ERP and records them (no second ERP order)."""
        with self._woken_lock:
            lock = self._shop_locks.setdefault(shop, threading.Lock())
        with lock:
            self._work_off_locked(shop, now, result)

    def _work_off_locked(self, shop: str, now: datetime, result: CycleResult) -> None:
        done: set[str] = set()
        while True:
            due = [(e, s) for e, s in self.ledger.due(shop, now, limit=BATCH) if e not in done]
            if not due:
                return
            done.update(e for e, _ in due)
            for e, st in due:
                if st == "update-pending":
                    self.actions.apply_update(shop, e, now, result)
            todo = [e for e, st in due if st != "update-pending"]
            if todo:
                self.importer.import_batch(shop, todo, now, result)

    # -- webhooks -------------------------------------------------------------------------------

    def ingest_webhook_payload(
        self, shop: str, raw: bytes, delivery_id: str | None, e_number: str | None = None
    ) -> bool:
        """Record a webhook body in the one inbox (``e_number``: the receiver already knows it).

        True when it was stored (a new order or a new version), False for a duplicate (the same
        payload is already recorded) — the receiver's ``StoreCallback`` contract; both are
        answered 2xx. When the staging store cannot take it the error propagates, so the
        receiver answers 5xx and the shop delivers again.

        The shop is answered as soon as the delivery is committed to the inbox — the ERP write
        (0.1-0.3 s an order) is not part of the request, so bursts do not run into the shop's
        timeout and redeliveries. The import runs from the inbox right after, on the importer's
        own thread (:meth:`wake`); if the ERP cannot take it then, the next cycle does.
        """
        offered = self.inbox.offer_webhook(shop, raw, delivery_id, utcnow(), e_number)
        if offered.outcome in ("new", "changed") and offered.entry_state == "awaiting":
            self.wake(shop)
        return offered.outcome != "same"

    def store_webhook_delivery(self, delivery: WebhookDelivery) -> bool:
        """``StoreCallback`` for :func:`replicator.connectors.make_webhook_receiver`: the daemon
        wires each shop's receiver to this method of the running service."""
        trusted = delivery.e_number if getattr(delivery, "trusted_e_number", False) else None
        return self.ingest_webhook_payload(
            delivery.shop, delivery.raw, delivery.delivery_id, trusted
        )

    def wake(self, shop: str) -> None:
        """Import what the inbox holds for ``shop`` now, on the importer's background thread."""
        with self._woken_lock:
            self._woken.add(shop)
            if self._waker is None and not self._closing.is_set():
                self._waker = threading.Thread(
                    target=self._work_woken, name="order-import-woken", daemon=True
                )
                self._waker.start()
        self._wake.set()

    def _work_woken(self) -> None:
        while not self._closing.is_set():
            self._wake.wait()
            self._wake.clear()
            with self._woken_lock:
                shops, self._woken = self._woken, set()
            for shop in sorted(shops):
                if self._closing.is_set():
                    return
                try:
                    self.work_off(shop)
                except (SyncError, sa.exc.SQLAlchemyError, OSError) as exc:
                    # The orders stay awaiting in the inbox; the next cycle imports them.
                    log.warning("order_import_deferred", shop=shop, error=str(exc))
                except Exception:
                    log.exception("order_import_woken_failed", shop=shop)
