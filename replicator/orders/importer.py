"""The order import cycle: download → inbox → criteria → map → write once → ledger.

:class:`OrderImportService` is what the daemon loop drives (``run_cycle(now)`` on the
``[schedules] orders`` schedule) and what the CLI commands use. Per shop, a cycle

1. asks the connector for orders changed in ``[watermark - overlap, now)`` (the first time
   ``first_lookback_hours`` back), retrying transient shop failures with backoff and jitter;
2. records every order in the one inbox (:mod:`replicator.orders.inbox`), which de-duplicates
   webhook, poll and sweep arrivals by (shop, e-number);
3. once a day (``reconcile_interval_hours``) sweeps the last ``reconcile_days`` the same way;
4. works off the ledger: every ``awaiting`` order is checked against the import criteria, mapped
   and written once (:mod:`replicator.orders.writer`); changed orders already in the ERP are
   re-imported when allowed, else queued for ``sync-daemon accept``;
5. advances the watermark — only now, after everything the window covered is committed to the
   ledger (an order the ERP could not take yet stays ``awaiting`` there, so moving the watermark
   loses nothing) — and resets the shop's consecutive-failure counter.

A cycle in which the shop or the ERP is unreachable counts as failed; after
``max_consecutive_failures`` the shop's import is cancelled ("cancelled: too many consecutive
errors") and only probed every ``probe_interval_minutes``; ``sync-daemon download`` restarts it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from replicator.config.orders import ImportCriteria, OrdersSection
from replicator.connectors.base import ShopConnector, ShopOrder
from replicator.db import make_engine
from replicator.errors import ConfigError, FatalError, RetryableError, SyncError
from replicator.errors_map import is_retryable, is_schema_mismatch
from replicator.failpoints import failpoint
from replicator.mappers import expr as ex
from replicator.mappers.orders import OrderRejected
from replicator.mappers.plan import load_any, validate_any
from replicator.orders.inbox import Inbox, Offered, PayloadError, no_e_number_reason, parse_payload
from replicator.orders.ledger import Entry, Ledger, ShopState
from replicator.orders.mappings import AnyMapping, AnyWriter, MappingUnfit, make_writer
from replicator.orders.writer import (
    ErpUnavailable,
    NotInErp,
    OrderPosted,
    WriteResult,
    db_message,
)

log = structlog.get_logger(__name__)

CANCELLED = "cancelled: too many consecutive errors"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _naive(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def _as_generator(it: Iterator[ShopOrder]) -> Generator[ShopOrder, None, None]:
    yield from it


@dataclass(frozen=True)
class OrderNote:
    shop: str
    e_number: str
    reason: str


@dataclass(frozen=True)
class _Outcome:
    """What one order's import attempt decided; recorded in the ledger by the caller."""

    shop: str
    e_number: str
    values: dict[str, Any]
    event: tuple[str, str] | None
    note: tuple[str, str] | None
    transient: str | None = None


@dataclass
class CycleResult:
    """Counters of one cycle, and the reason for every skipped or errored order."""

    total: int = 0
    new: int = 0
    skipped: int = 0
    errored: int = 0
    updated: int = 0
    # Seen again with the same payload: their fate is already recorded (not "skipped" again).
    unchanged: int = 0
    skipped_orders: list[OrderNote] = field(default_factory=list)
    errored_orders: list[OrderNote] = field(default_factory=list)
    shops: dict[str, str] = field(default_factory=dict)

    def skip(self, shop: str, e: str, reason: str) -> None:
        self.skipped += 1
        self.skipped_orders.append(OrderNote(shop, e, reason))

    def error(self, shop: str, e: str, reason: str) -> None:
        self.errored += 1
        self.errored_orders.append(OrderNote(shop, e, reason))

    @property
    def ok(self) -> bool:
        return all(s == "ok" for s in self.shops.values())

    def summary(self) -> str:
        return (
            f"total {self.total}, new {self.new}, skipped {self.skipped}, errored {self.errored}"
            + (f", updated {self.updated}" if self.updated else "")
            + (f", unchanged {self.unchanged}" if self.unchanged else "")
        )


class _WaitRetryAfter(wait_base):
    """Exponential backoff with jitter, but never shorter than the shop's Retry-After."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.inner = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)

    def __call__(self, retry_state: Any) -> float:
        base = float(self.inner(retry_state))
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        return max(base, float(hint)) if hint else base


def check_criteria(
    crit: ImportCriteria, payload: Mapping[str, Any], status: str | None
) -> str | None:
    """None when the order may be imported, else why not (shown to the shop owner)."""
    found = next(
        (v for f in crit.status_fields if (v := ex._get(payload, f)) not in ("", None)), None
    )
    st = str(found or status or "").lower()
    allowed = [s.lower() for s in crit.statuses]
    if st not in allowed:
        shown = st or "(none)"
        return f"status {shown!r} is not imported (orders.criteria statuses: {', '.join(allowed)})"
    if crit.fulfillment_statuses:
        ful = next(
            (v for f in crit.fulfillment_fields if (v := ex._get(payload, f)) not in ("", None)), ""
        )
        wanted = [s.lower() for s in crit.fulfillment_statuses]
        if str(ful).lower() not in wanted:
            return (
                f"fulfilment {str(ful) or '(none)'!r} is not imported "
                f"(orders.criteria fulfillment_statuses: {', '.join(wanted)})"
            )
    if crit.paid_only and not ex._get(payload, crit.paid_field):
        return f"not paid yet ({crit.paid_field} is empty; orders.criteria paid_only = true)"
    if crit.mode == "wait_for_invoice" and not ex._get(payload, crit.invoice_field):
        return (
            f"waiting for the shop's invoice ({crit.invoice_field} is empty; mode wait_for_invoice)"
        )
    return None


class _LoadedMapping:
    def __init__(self, mapping: AnyMapping, writer: AnyWriter, mtime: float) -> None:
        self.mapping = mapping
        self.writer = writer
        self.mtime = mtime


_active: OrderImportService | None = None
_active_lock = threading.Lock()


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
        global _active
        self.cfg = cfg
        self.ocfg: OrdersSection = cfg.orders
        self.ledger = ledger or Ledger(cfg.staging_url)
        self.engine = erp_engine or make_engine(cfg.erp.writer_url, "orders")
        self.inbox = Inbox(self.ledger, self.ocfg.e_number_fields)
        self._connectors: dict[str, ShopConnector] | None = (
            dict(connectors) if connectors is not None else None
        )
        self._mappings: dict[str, _LoadedMapping] = {}
        self._criteria_checked: dict[str, ImportCriteria] = {}
        # Mapping path -> why it no longer fits the ERP (schema changed under it): the order
        # service is not ready until a re-validation passes; capture and the rest go on.
        self._unfit: dict[str, str] = {}
        self._refit: set[str] = set()  # fits again: its parked orders are retried once
        self._sleep = sleep
        self._executor: ThreadPoolExecutor | None = None
        # Shops whose inbox got new orders (webhooks): imported by one background thread.
        self._woken: set[str] = set()
        self._woken_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._waker: threading.Thread | None = None
        # One import of a shop's inbox at a time (the cycle and the woken thread share it).
        self._shop_locks: dict[str, threading.Lock] = {}
        # Validate every mapping in use at start-up: a bad mapping is a configuration error.
        shops = {s.name for s in getattr(cfg, "shops", ())} | set(self._connectors or {})
        for shop in sorted(shops) or ["default"]:
            try:
                self._mapping(shop)
            except ErpUnavailable as exc:
                # Start anyway: the first cycle checks the mapping once the ERP answers (and
                # counts as failed until it does). A malformed mapping still stops the start-up.
                log.warning("order_import_erp_unavailable", shop=shop, error=str(exc))
            except MappingUnfit as exc:
                # Start anyway, not ready (/readyz says why); every cycle checks again.
                log.error("mapping_does_not_fit_erp", shop=shop, error=str(exc))
        with _active_lock:
            _active = self

    # -- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        global _active
        with _active_lock:
            if _active is self:
                _active = None
        self._closing.set()
        self._wake.set()
        if self._waker is not None:
            self._waker.join(timeout=30)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for c in (self._connectors or {}).values():
            try:
                c.close()
            except Exception:  # closing is best effort
                log.warning("connector_close_failed", shop=getattr(c, "name", "?"))
        self.ledger.close()
        self.engine.dispose()

    @property
    def connectors(self) -> dict[str, ShopConnector]:
        if self._connectors is None:
            from replicator.connectors import make_connector

            base = Path(self.cfg.source_path).parent if self.cfg.source_path else None
            self._connectors = {s.name: make_connector(s, base) for s in self.cfg.shops}
        return self._connectors

    def _mapping_path(self, shop: str) -> Path:
        return Path(self.cfg.resolve_path(self.ocfg.mapping_for(shop)))

    def _mapping(self, shop: str) -> _LoadedMapping:
        """The shop's mapping; reloaded (and re-validated) when the file changed."""
        path = self._mapping_path(shop)
        key = str(path)
        loaded = self._mappings.get(key)
        try:
            mtime = path.stat().st_mtime
        except OSError as exc:
            if loaded is not None:
                return loaded
            raise ConfigError(f"{path}: cannot read mapping file: {exc.strerror}") from None
        unfit = key in self._unfit
        if loaded is not None and loaded.mtime == mtime and not unfit:
            return loaded
        try:
            m = load_any(path, self.cfg.erp.dialect)  # a malformed file stops the start-up
            if loaded is not None and m.hash == loaded.mapping.hash and not unfit:
                loaded.mtime = mtime
                return loaded
            try:
                validate_any(m, self.engine)
            except ConfigError as exc:
                if loaded is None:
                    # The ERP does not fit the mapping (e.g. after an ERP upgrade): the order
                    # import is not ready and orders wait in the inbox; capture goes on.
                    self._unfit[key] = str(exc)
                    raise MappingUnfit(str(exc)) from None
                raise
            writer = make_writer(self.engine, m, create_index=self.ocfg.create_e_number_index)
        except sa.exc.DBAPIError as exc:
            # The ERP is unreachable right now: a transient condition, not a bad mapping.
            if loaded is None:
                raise ErpUnavailable(
                    f"cannot check the mapping against the ERP: {db_message(exc)}"
                ) from None
            log.warning("mapping_check_deferred", path=key, error=db_message(exc))
            return loaded
        except ConfigError as exc:
            if loaded is None:
                raise
            # Keep importing with the last good mapping; the operator sees why in the log.
            log.error("mapping_reload_failed", path=key, error=str(exc))
            loaded.mtime = mtime
            if unfit:
                # The ERP changed under the mapping: /readyz shows start-up's messages.
                self._unfit[key] = str(exc)
            return loaded
        if unfit:
            log.info("mapping_fits_again", path=key)
            self._unfit.pop(key, None)
            self._refit.add(key)
        new = _LoadedMapping(m, writer, mtime)
        if loaded is not None:
            log.info("mapping_reloaded", path=key, hash=m.hash[:12])
        self._mappings[key] = new
        return new

    def readiness(self) -> tuple[bool, str]:
        """For ``/readyz``: not ready while a mapping no longer fits the ERP."""
        if not self._unfit:
            return True, "mappings fit the ERP"
        return False, "; ".join(f"{p}: {why}" for p, why in sorted(self._unfit.items()))

    def writer_for(self, shop: str) -> AnyWriter:
        return self._mapping(shop).writer

    def _retrying(self, retry_on: Callable[[BaseException], bool]) -> Retrying:
        kwargs: dict[str, Any] = {}
        if self._sleep is not None:
            kwargs["sleep"] = self._sleep
        return Retrying(
            stop=stop_after_attempt(self.ocfg.retry_attempts),
            wait=_WaitRetryAfter(self.ocfg.backoff_initial, self.ocfg.backoff_max),
            retry=retry_if_exception(retry_on),
            reraise=True,
            **kwargs,
        )

    def _with_retry(self, fn: Callable[..., WriteResult], *args: Any, **kwargs: Any) -> WriteResult:
        """Call ``fn``; on a transient failure retry it with backoff and jitter."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            # The common case (success) needs no retry machinery; only failures pay for it.
            if not is_retryable(exc) or self.ocfg.retry_attempts <= 1:
                raise
        # Retries take fresh connections from the pool: a caller's connection may be broken.
        kwargs.pop("conn", None)
        result: WriteResult = self._retrying(is_retryable)(fn, *args, **kwargs)
        return result

    def _backoff(self, attempts: int) -> timedelta:
        seconds = min(
            self.ocfg.backoff_max * 10, max(1.0, self.ocfg.backoff_initial) * 2 ** min(attempts, 12)
        )
        return timedelta(seconds=min(seconds, self.ocfg.interval * 4))

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
        now = _naive(now) if now else utcnow()
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
        if state.cancelled and not force and state.next_probe_at and now < state.next_probe_at:
            result.shops[shop] = (
                f"{CANCELLED} (next probe {state.next_probe_at:%Y-%m-%d %H:%M} UTC)"
            )
            return
        if state.cancelled:
            log.info("order_import_probe" if not force else "order_import_restarted", shop=shop)
        start = (
            _naive(since)
            if since
            else (
                state.watermark - timedelta(seconds=self.ocfg.overlap)
                if state.watermark
                else now - timedelta(hours=self.ocfg.first_lookback_hours)
            )
        )
        end = _naive(until) if until else now
        seen: set[str] = set()
        try:
            self._mapping(shop)
            for e in self._retry_mapping_failures(shop, now):
                seen.add(e)
            self._recheck_skipped(shop, now, result)
            self._download(shop, connector, start, end, "poll", now, result, seen)
            reconcile = (
                state.last_reconcile_at is None
                or now - state.last_reconcile_at
                >= timedelta(hours=self.ocfg.reconcile_interval_hours)
            )
            if reconcile:
                self._download(
                    shop,
                    connector,
                    now - timedelta(days=self.ocfg.reconcile_days),
                    now,
                    "sweep",
                    now,
                    result,
                    seen,
                )
            self._work_off(shop, now, result)
        except (SyncError, sa.exc.SQLAlchemyError, OSError) as exc:
            self._cycle_failed(shop, state, now, exc, result)
            return
        failpoint("orders.watermark")
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
                last_reconcile_at=now if reconcile else state.last_reconcile_at,
            )
        )
        result.shops[shop] = "ok"

    def _work_off_only(self, shop: str, now: datetime, result: CycleResult) -> None:
        state = self.ledger.shop_state(shop)
        try:
            self._mapping(shop)
            self._retry_mapping_failures(shop, now)
            self._recheck_skipped(shop, now, result)
            self._work_off(shop, now, result)
        except (SyncError, sa.exc.SQLAlchemyError, OSError) as exc:
            self._cycle_failed(shop, state, now, exc, result)
            return
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
        result.shops[shop] = "ok"

    def _cycle_failed(
        self, shop: str, state: ShopState, now: datetime, exc: BaseException, result: CycleResult
    ) -> None:
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

    def _download(
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
                        self._note_arrival(order, o, result)
                page.clear()

            window = (since.replace(tzinfo=UTC), until.replace(tzinfo=UTC))
            # closing(): a failed page ends the fetch at once, so the source takes back what it
            # handed out and not acknowledged (the retry below is offered it again).
            with closing(_as_generator(connector.fetch_orders(*window))) as orders:
                for order in orders:
                    page.append(order)
                    if len(page) >= 100:
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

        self._retrying(retry_on)(fetch)

    def _note_arrival(self, order: ShopOrder, offered: Offered, result: CycleResult) -> None:
        # An order seen again unchanged has no new fate: not logged, counted or re-checked
        # (that made skipped orders flicker to awaiting and log a line every cycle). A change of
        # the order goes through the inbox ("changed"); of the criteria, _recheck_skipped.
        if offered.outcome == "same":
            result.unchanged += 1

    def _recheck_skipped(self, shop: str, now: datetime, result: CycleResult) -> None:
        """Decide skipped orders again when the criteria they were judged by may have changed:
        once per service (a config reload builds a new one), in place — never via awaiting."""
        crit = self.ocfg.criteria_for(shop)
        if self._criteria_checked.get(shop) == crit:
            return
        skipped = [e for e, st, _ in self.ledger.e_numbers(shop) if st == "skipped"]
        for i in range(0, len(skipped), self.BATCH):
            self._process_batch(shop, skipped[i : i + self.BATCH], now, result)
        self._criteria_checked[shop] = crit

    def _retry_mapping_failures(self, shop: str, now: datetime) -> list[str]:
        """Orders parked for a mapping problem are retried when the mapping files changed."""
        current = self._mapping(shop).mapping.hash
        path = str(self._mapping_path(shop))
        # After the ERP fitted the mapping again every mapping failure is retried ("" matches
        # no mapping hash); otherwise only those parked under other mapping files.
        todo = self.ledger.mapping_failures(shop, "" if path in self._refit else current)
        self._refit.discard(path)
        for e in todo:
            with self.ledger.begin() as conn:
                self.ledger.update(conn, shop, e, state="awaiting", next_attempt_at=None)
                self.ledger.event(conn, shop, e, now, "requeued", "mapping files changed; retrying")
        return todo

    def work_off(self, shop: str, now: datetime | None = None) -> CycleResult:
        """Import what the inbox holds for ``shop`` now, without downloading (e.g. right after
        webhook deliveries)."""
        result = CycleResult()
        self._work_off(shop, _naive(now) if now else utcnow(), result)
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
            due = [(e, s) for e, s in self.ledger.due(shop, now, limit=self.BATCH) if e not in done]
            if not due:
                return
            done.update(e for e, _ in due)
            for e, st in due:
                if st == "update-pending":
                    self._apply_update(shop, e, now, result)
            todo = [e for e, st in due if st != "update-pending"]
            if todo:
                self._process_batch(shop, todo, now, result)

    BATCH = 200

    def _pool(self) -> ThreadPoolExecutor | None:
        if self.ocfg.workers <= 1:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.ocfg.workers, thread_name_prefix="order-import"
            )
        return self._executor

    def _process_batch(self, shop: str, es: list[str], now: datetime, result: CycleResult) -> None:
        entries = self.ledger.get_many(shop, es)
        writer = self.writer_for(shop)
        mapping_hash = writer.m.hash
        crit = self.ocfg.criteria_for(shop)

        def chunk(part: list[Entry]) -> list[_Outcome]:
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
                    o = self._decide(entry, now, writer, mapping_hash, crit, conn)
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
            self._count(o, result)
        transient = [o.transient for o in outcomes if o.transient]
        if transient:
            raise ErpUnavailable(f"ERP unavailable: {transient[0]}")

    # -- one order ------------------------------------------------------------------------------

    def process(
        self, shop: str, e: str, now: datetime | None = None, result: CycleResult | None = None
    ) -> Entry | None:
        """Import one order now (awaiting, failed or skipped). Transient ERP trouble raises
        ErpUnavailable after the in-place retries (the order stays awaiting, with a retry time)."""
        now = now or utcnow()
        entry = self.ledger.get(shop, e)
        if entry is None or entry.state not in ("awaiting", "failed", "skipped"):
            return entry
        writer = self.writer_for(shop)
        o = self._decide(entry, now, writer, writer.m.hash, self.ocfg.criteria_for(shop))
        with self.ledger.begin() as conn:
            self._record(conn, o, now)
        if result is not None:
            self._count(o, result)
        if o.transient:
            raise ErpUnavailable(f"ERP unavailable: {o.transient}")
        return self.ledger.get(shop, e)

    def _decide(
        self,
        entry: Entry,
        now: datetime,
        writer: AnyWriter,
        mapping_hash: str,
        crit: ImportCriteria,
        conn: sa.Connection | None = None,
    ) -> _Outcome:
        """What happens to one order: criteria, mapping and the ERP write; no ledger writes
        (the caller records the outcome), so it can run on a worker thread."""
        shop, e = entry.shop, entry.e_number
        attempts = entry.attempts + 1

        def fail(reason: str, kind: str) -> _Outcome:
            log.warning("order_failed", shop=shop, e_number=e, reason=reason, kind=kind)
            return _Outcome(
                shop,
                e,
                {
                    "state": "failed",
                    "last_error": reason,
                    "error_kind": kind,
                    "mapping_hash": mapping_hash,
                    "attempts": attempts,
                    "next_attempt_at": None,
                },
                ("failed", reason),
                ("error", reason),
            )

        raw = entry.payload
        if len(raw) > self.ocfg.max_payload_bytes:
            return fail(
                f"payload is {len(raw) / 1e6:.1f} MB, above the limit of "
                f"{self.ocfg.max_payload_bytes / 1e6:.1f} MB (orders.max_payload_bytes)",
                "input",
            )
        try:
            payload = parse_payload(raw)
        except PayloadError as exc:
            return fail(str(exc), "input")
        if not isinstance(payload, dict):
            return fail("payload is not a JSON object", "input")
        if e.startswith("unreadable-"):
            return fail(no_e_number_reason(payload, self.ocfg.e_number_fields), "input")
        why = check_criteria(crit, payload, entry.shop_status)
        if why is not None:
            if entry.state == "skipped" and entry.last_error == why:
                # Same fate as recorded: nothing to log, count or add to the timeline.
                return _Outcome(shop, e, {}, None, None)
            log.info("order_skipped", shop=shop, e_number=e, reason=why)
            return _Outcome(
                shop,
                e,
                {"state": "skipped", "last_error": why, "error_kind": None},
                ("skipped", why),
                ("skip", why),
            )
        try:
            res: WriteResult = self._with_retry(
                writer.write, shop, e, payload, auto_invoice=crit.mode == "auto_invoice", conn=conn
            )
        except OrderRejected as exc:
            return fail(exc.reason, exc.kind)
        except Exception as exc:
            if is_retryable(exc):
                msg = db_message(exc)
                log.warning("order_retry_later", shop=shop, e_number=e, error=msg)
                return _Outcome(
                    shop,
                    e,
                    {
                        "state": "awaiting",
                        "attempts": attempts,
                        "last_error": msg,
                        "error_kind": "transient",
                        "next_attempt_at": now + self._backoff(attempts),
                    },
                    ("retry later", f"ERP unavailable: {msg}"),
                    ("error", f"ERP unavailable, will retry: {msg}"),
                    transient=msg,
                )
            if isinstance(exc, sa.exc.DBAPIError):
                if is_schema_mismatch(exc):
                    # Not this order's fault: park it as a mapping problem (retried when the
                    # mapping changes) and re-validate the mapping before the next order.
                    self._unfit.setdefault(writer.m.path, db_message(exc))
                    return fail(f"the mapping no longer fits the ERP: {db_message(exc)}", "mapping")
                return fail(f"ERP rejected the order: {db_message(exc)}", "input")
            # Bad input never stops the line: whatever this order triggers, park it.
            log.exception("order_import_error", shop=shop, e_number=e)
            return fail(f"unexpected error: {type(exc).__name__}: {str(exc)[:200]}", "input")
        log.info(
            "order_imported",
            shop=shop,
            e_number=e,
            order_number=res.order_number,
            created=res.created,
        )
        values = {
            "state": "delivered",
            "erp_order_no": res.order_number,
            "attempts": attempts,
            "last_error": None,
            "error_kind": None,
            "next_attempt_at": None,
            "delivered_at": utcnow(),
        }
        if res.created:
            return _Outcome(
                shop,
                e,
                values,
                ("written", f"ERP order {res.order_number}, {res.lines} line(s)"),
                ("new", ""),
            )
        return _Outcome(
            shop,
            e,
            values,
            (
                "found in ERP",
                f"ERP order {res.order_number} already has this e-number; recorded it",
            ),
            ("skip", f"already in the ERP as order {res.order_number}"),
        )

    def _record(self, conn: sa.Connection, o: _Outcome, now: datetime) -> None:
        if o.values:
            self.ledger.update(conn, o.shop, o.e_number, **o.values)
        if o.event is not None:
            self.ledger.event(conn, o.shop, o.e_number, now, o.event[0], o.event[1])

    @staticmethod
    def _count(o: _Outcome, result: CycleResult) -> None:
        if o.note is None:
            return
        kind, reason = o.note
        if kind == "new":
            result.new += 1
        elif kind == "skip":
            result.skip(o.shop, o.e_number, reason)
        else:
            result.error(o.shop, o.e_number, reason)

    # -- updates --------------------------------------------------------------------------------

    def _queue_update(self, shop: str, e: str, now: datetime, why: str) -> None:
        with self.ledger.begin() as conn:
            self.ledger.update(conn, shop, e, update_queued=True, last_error=why)
            self.ledger.event(conn, shop, e, now, "update queued", why)

    def _apply_update(self, shop: str, e: str, now: datetime, result: CycleResult) -> None:
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

    def _replace(self, entry: Entry, *, force: bool, now: datetime, how: str) -> WriteResult:
        assert entry.pending_payload is not None
        payload = parse_payload(entry.pending_payload)
        crit = self.ocfg.criteria_for(entry.shop)
        res = self._retrying(is_retryable)(
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

    def _one(self, e: str, shop: str | None) -> Entry:
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

    def accept(self, e: str, shop: str | None = None, force: bool = False) -> WriteResult:
        entry = self._one(e, shop)
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
        entry = self._one(e, shop)
        if entry.state != "update-pending":
            raise FatalError(f"order {e} has no pending update (state {entry.state})")
        with self.ledger.begin() as conn:
            # pending_hash stays: the same version arriving again is then recognised as known.
            self.ledger.update(
                conn,
                entry.shop,
                e,
                state="delivered",
                pending_payload=None,
                update_queued=False,
                diff=None,
                last_error=None,
            )
            self.ledger.event(
                conn,
                entry.shop,
                e,
                utcnow(),
                "update ignored",
                "the ERP order keeps the imported version",
            )

    def cancel(self, e: str, shop: str | None = None) -> str:
        entry = self._one(e, shop)
        if entry.erp_order_no is None:
            raise FatalError(f"order {e} is not in the ERP (state {entry.state})")
        order_no = self.writer_for(entry.shop).cancel(e)
        with self.ledger.begin() as conn:
            self.ledger.update(
                conn,
                entry.shop,
                e,
                state="delivered",
                pending_payload=None,
                update_queued=False,
                diff=None,
            )
            self.ledger.event(
                conn, entry.shop, e, utcnow(), "cancelled", f"ERP order {order_no} marked cancelled"
            )
        return order_no

    def retry(self, e: str, shop: str | None = None) -> Entry | None:
        entry = self._one(e, shop)
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
        return self.process(entry.shop, e, now)

    def restart_shop(self, shop: str) -> None:
        state = self.ledger.shop_state(shop)
        self.ledger.save_shop(
            replace(
                state,
                cancelled=False,
                cancelled_reason=None,
                next_probe_at=None,
                consecutive_failures=0,
            )
        )

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

    def store_webhook_delivery(self, delivery: Any) -> bool:
        """``StoreCallback`` for :func:`replicator.connectors.make_webhook_receiver`."""
        trusted = delivery.e_number if getattr(delivery, "trusted_e_number", False) else None
        return self.ingest_webhook_payload(
            delivery.shop, delivery.raw, delivery.delivery_id, trusted
        )


def ingest_webhook_payload(shop: str, raw: bytes, delivery_id: str | None) -> bool:
    """Store callback for the webhook receiver: hands the body to the running import service.

    True: stored; False: a duplicate. Raises :class:`RetryableError` when no import service runs
    (the receiver then answers 5xx and the shop redelivers later; nothing is lost).
    """
    with _active_lock:
        service = _active
    if service is None:
        raise RetryableError("order import is not running; deliver again later")
    return service.ingest_webhook_payload(shop, raw, delivery_id)


def describe(entry: Entry) -> dict[str, Any]:
    """The ledger row as plain data (for ``sync-daemon order`` and JSON output)."""
    return {
        "shop": entry.shop,
        "e_number": entry.e_number,
        "state": entry.state + (" (queued for accept)" if entry.update_queued else ""),
        "erp_order_no": entry.erp_order_no,
        "attempts": entry.attempts,
        "last_error": entry.last_error,
        "shop_status": entry.shop_status,
        "first_seen": entry.first_seen,
        "last_seen": entry.last_seen,
        "payload_bytes": len(entry.payload),
        "payload_hash": entry.payload_hash,
        "diff": json.loads(entry.diff) if entry.diff else None,
    }
