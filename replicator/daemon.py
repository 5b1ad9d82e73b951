"""The daemon: the main loop and its life cycle, in the Patroni style.

Signal handlers only set flags. The loop is: reload if SIGHUP arrived, run one cycle of every
service that is due (capture runs continuously, in slices of about a second), write the heartbeat
when due, tick the liveness clock, repeat. Shutdown always runs in ``finally``: the capture
source commits the batch of whole source transactions it holds (or rolls back a partial one),
connections close, and the process exits within ``daemon.shutdown_timeout`` seconds.

Failures are classified: a :class:`RetryableError` (connection lost, server restarting) closes
the source and reconnects with capped exponential backoff and jitter; a :class:`FatalError`
(slot gone, bad schema, a second daemon) stops the daemon with the reason and its exit code (3
for the source, 4 for refused access; see :mod:`replicator.errors`), which the systemd unit does
not restart in a loop (``RestartPreventExitStatus``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog

from replicator import metrics, sdnotify
from replicator.cdc import make_source
from replicator.cdc.base import CaptureSource
from replicator.config import Config, load_config, warn_if_world_readable
from replicator.config.watch import ConfigWatcher
from replicator.errors import AccessError, ConfigError, FatalError, RetryableError, SyncError
from replicator.log import setup_logging
from replicator.staging import StagingStore

log = structlog.get_logger(__name__, service="daemon")

# How often the main loop refreshes its liveness mark in staging (``status`` reads it).
ALIVE_INTERVAL = 5.0


@dataclass
class ServiceState:
    """What status and the Manage page show for one service."""

    name: str
    last_run_at: dt.datetime | None = None
    last_result: str = "not run yet"
    last_ok: bool | None = None
    next_run_at: dt.datetime | None = None
    breaker_open: bool = False
    progress: str = ""
    failures: int = 0


@dataclass
class DaemonState:
    """Shared between the loop and the health server (read-only there)."""

    started_at: float = field(default_factory=time.monotonic)
    last_tick: float = field(default_factory=time.monotonic)
    capture_connected: bool = False
    last_error: str = ""
    services: dict[str, ServiceState] = field(default_factory=dict)

    def service(self, name: str) -> ServiceState:
        s = self.services.get(name)
        if s is None:
            s = self.services[name] = ServiceState(name)
        return s


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 1.0, cap: float = 60.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.base * 2 ** (self.attempt - 1))) + 0.1

    def reset(self) -> None:
        self.attempt = 0


class Daemon:
    """One sync-daemon process."""

    def __init__(self, config_path: str, cfg: Config | None = None) -> None:
        self.config_path = config_path
        self.cfg = cfg or load_config(config_path)
        self.stop = threading.Event()
        self._reload = threading.Event()
        self.state = DaemonState()
        self.store: StagingStore | None = None
        self.source: CaptureSource | None = None
        self._backoff = Backoff()
        self._retry_at = 0.0
        self._last_heartbeat = 0.0
        self._last_summary = time.monotonic()
        self._summary_changes = 0
        self.hooks: list[Callable[[Daemon], None]] = []  # extra per-cycle work (services)
        self.on_stop: list[Callable[[], None]] = []
        self.health: Any = None
        self.logstore: Any = None
        self.notifier: Any = None
        self._ready_sent = False
        self.runners: list[Any] = []
        self._services_stop = threading.Event()  # set on shutdown, and to rebuild on reload
        self._watcher: ConfigWatcher | None = None
        self.pushers: dict[str, Any] = {}
        self.order_service: Any = None
        self._watchdog = sdnotify.watchdog_interval()
        self._last_watchdog = 0.0
        self._last_alive = 0.0
        self._started_at_utc = dt.datetime.now(dt.UTC)
        self._exit_code = 1  # until run() says otherwise: a crash is not a clean stop

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload.set()

    # ------------------------------------------------------------------ life cycle
    def run(self) -> int:
        cfg = self.cfg
        warn_if_world_readable(self.config_path)
        if cfg.staging.url is None:
            os.makedirs(cfg.daemon.state_dir, exist_ok=True)
        self.store = StagingStore(cfg.staging_url)
        log.info(
            "daemon_starting",
            config=self.config_path,
            mode=cfg.capture.mode,
            tables=list(cfg.capture.tables),
            staging=cfg.staging_url.split(":", 1)[0],
            pid=os.getpid(),
        )
        code = 0
        try:
            self._wait_for_staging()
            if not self.stop.is_set():
                self._mark_alive(force=True)
                self.store.start_checkpointer()
                self._start_side_services()
            while not self.stop.is_set():
                if self._reload.is_set() or (self._watcher is not None and self._watcher.changed()):
                    self._reload.clear()
                    self.reload()
                self.cycle()
        except FatalError as exc:
            log.error("daemon_stopped_fatal", error=str(exc), exit_code=exc.exit_code)
            self.state.last_error = str(exc)
            code = exc.exit_code
            svc = self.state.service("capture")
            svc.last_run_at, svc.last_ok, svc.last_result = (
                dt.datetime.now(dt.UTC),
                False,
                f"stopped: {exc}",
            )
            self._save_capture_state()
            if self.notifier is not None:
                self.notifier.report("capture", "erp", False, f"stopped: {exc}")
                self.notifier.tick()
        except BaseException:
            code = 1  # recorded as the exit of a crash, then raised on
            raise
        finally:
            self._exit_code = code
            self.shutdown()
        log.info("daemon_stopped", exit_code=code)
        return code

    def _wait_for_staging(self) -> None:
        """Set the staging store up, waiting (with backoff) while its server does not answer —
        e.g. a staging PostgreSQL that starts after us at boot. Nothing is read from the ERP, an
        inbox folder, a shop or a webhook before it answers, so nothing is taken that could not
        be stored. Returns early when a stop is requested."""
        assert self.store is not None
        delay = 1.0
        while True:
            try:
                self.store.setup()
                return
            except RetryableError as exc:
                # Only "cannot reach": a refused login or an unwritable SQLite folder is an
                # AccessError, which no waiting fixes.
                log.warning("staging_unavailable", error=str(exc), retry_in_seconds=delay)
                sdnotify.status(f"waiting for the staging store (retry in {delay:.0f} s)")
                sdnotify.watchdog_ping()  # waiting is not hanging
                if self.stop.wait(delay):
                    return
                delay = min(delay * 2, 30.0)

    def _start_side_services(self) -> None:
        """Log store, notifier, health server: everything around the capture loop."""
        from replicator.log import add_sink
        from replicator.logstore import LogStore
        from replicator.notify import Notifier

        assert self.store is not None
        cfg = self.cfg
        self.logstore = LogStore(self.store.engine, cfg.logging.retention_days)
        self.logstore.start()
        add_sink(self.logstore.sink)
        self.notifier = Notifier(cfg.notify, name=cfg.daemon.name)
        groups = self._build_services()
        if cfg.health.enabled:
            self._start_health()
        self._start_runners(groups)
        self._watch_config()

    def _start_runners(self, groups: list[list[Any]]) -> None:
        from replicator.services import ServiceRunner

        assert self.store is not None
        for group in groups:
            runner = ServiceRunner(
                group,
                self.state,
                self.notifier,
                self._services_stop,
                on_update=self.store.save_service,
            )
            runner.start()
            self.runners.append(runner)

    def _stop_runners(self, timeout: float) -> None:
        self._services_stop.set()
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            runner.join(max(0.1, deadline - time.monotonic()))
        self.runners = []
        self.pushers = {}
        self.order_service = None

    def _watch_config(self) -> None:
        """Reload when the config file's content changes on disk (as SIGHUP does); mapping
        files are re-read by the order import itself when they change."""
        watcher = ConfigWatcher(self.config_path)
        if watcher.start():
            self._watcher = watcher

    def _build_services(self) -> list[list[Any]]:
        """Order import, stock and invoice push, housekeeping: one worker thread per group."""
        from replicator.services import Service

        assert self.store is not None
        cfg = self.cfg
        store = self.store
        groups: list[list[Service]] = []
        connectors = self._connectors()
        if cfg.orders.enabled and cfg.shops:
            groups.append(self._order_services(connectors))
        push: list[Service] = []
        if cfg.stock_push is not None:
            push.extend(self._stock_services(connectors))
        if cfg.invoice_push is not None:
            from replicator.push.invoices import InvoicePushService

            invoices = InvoicePushService(cfg, store, connectors)
            self.pushers["invoices"] = invoices
            push.append(
                Service(
                    "invoices",
                    cfg.schedules.schedule("invoices"),
                    lambda _now: _summary(invoices.run_cycle()),
                    progress=lambda: invoices.progress,
                    close=invoices.close,
                )
            )
        if push:
            groups.append(push)
        if cfg.stream is not None:  # its own thread: publishing must not wait behind a shop
            from replicator.stream.sink import stream_service

            groups.append([stream_service(cfg, store, self._services_stop)])
        groups.append(self._housekeeping_services())
        return groups

    def _mount_routes(self, health: Any) -> None:
        """Webhook receivers (shops, ERP) and the Manage page on the daemon's HTTP server."""
        cfg = self.cfg
        if self.pushers:
            from replicator.push.erp_webhook import erp_webhook_secret, make_erp_webhook_handler

            secret = erp_webhook_secret(cfg)
            if secret:
                handler = make_erp_webhook_handler(
                    secret, stock=self.pushers.get("stock"), invoices=self.pushers.get("invoices")
                )
                health.add_route("GET", "/webhooks/erp", handler, public=True)
                health.add_route("POST", "/webhooks/erp", handler, public=True)
        if self.order_service is not None:
            from replicator.connectors import make_webhook_receiver
            from replicator.health import Response

            for shop in cfg.shops:
                if shop.kind != "webhook" and shop.webhook_secret is None:
                    continue
                receiver = make_webhook_receiver(shop, self.order_service.store_webhook_delivery)

                def route(req: Any, r: Any = receiver) -> Any:
                    status, body = r.handle(req.headers, req.body)
                    return Response.json(body, status)

                health.add_route(
                    "POST",
                    f"/webhooks/shop/{shop.name}",
                    route,
                    public=True,
                    max_body=receiver.max_body,
                )
        from replicator.web.app import WebContext, mount

        assert self.store is not None
        mount(
            health,
            WebContext(
                config=cfg,
                staging_engine=self.store.engine,
                daemon_state=lambda: self.state,
                store=self.store,
                logstore=self.logstore,
                importer=self.order_service,
            ),
        )

    def _connectors(self) -> dict[str, Any]:
        from pathlib import Path

        from replicator.connectors import make_connector

        base = Path(self.cfg.source_path).parent if self.cfg.source_path else None
        return {s.name: make_connector(s, base) for s in self.cfg.shops if s.kind != "webhook"}

    def _order_services(self, connectors: dict[str, Any]) -> list[Any]:
        from replicator.orders.importer import OrderImportService
        from replicator.services import Service

        cfg = self.cfg
        orders = OrderImportService(cfg, connectors)
        self.order_service = orders
        return [
            Service(
                "orders",
                cfg.schedules.schedule("orders"),
                lambda now: self._order_cycle(orders),
                close=orders.close,
                # Open while a shop's import is cancelled (too many errors; only probed).
                breaker=lambda: any(st.cancelled for st in orders.ledger.shop_states()),
            ),
        ]

    def _order_cycle(self, orders: Any) -> str:
        """One import cycle; a shop that fails, or orders that fail, are one incident per shop."""
        result = orders.run_cycle()
        if self.notifier is not None:
            for shop, outcome in result.shops.items():
                self.notifier.report(
                    "orders", f"shop:{shop}", outcome == "ok", f"{shop}: {outcome}"
                )
                failed = [n for n in result.errored_orders if n.shop == shop]
                detail = "; ".join(f"{n.e_number}: {n.reason}" for n in failed[:5])
                self.notifier.report(
                    "orders",
                    f"failed-orders:{shop}",
                    not failed,
                    f"{len(failed)} order(s) of {shop} failed: {detail}"
                    if failed
                    else f"{shop}: no failed orders",
                )
        summary: str = result.summary()
        return summary

    def _stock_services(self, connectors: dict[str, Any]) -> list[Any]:
        from replicator.push.stock import StockPushService
        from replicator.schedules import Schedule
        from replicator.services import Service

        assert self.store is not None and self.cfg.stock_push is not None
        stock = StockPushService(self.cfg, self.store, connectors)
        self.pushers["stock"] = stock
        return [
            Service(
                "stock_push",
                Schedule.parse("continuous"),
                lambda _now: _summary(stock.run_cycle(stop=self.stop)),
                progress=lambda: stock.progress,
                close=stock.close,
            ),
            Service(
                "reconcile",
                Schedule.parse(
                    self.cfg.stock_push.reconcile_schedule, "stock_push.reconcile_schedule"
                ),
                lambda now: _summary(stock.reconcile(now, stop=self.stop)),
                progress=lambda: stock.progress,
            ),
        ]

    def _housekeeping_services(self) -> list[Any]:
        from replicator.schedules import Schedule
        from replicator.services import Service

        def housekeeping(_now: dt.datetime) -> str:
            assert self.store is not None
            purged = self.logstore.purge() if self.logstore is not None else 0
            pruned = self.store.journal_prune(keep_seconds=7 * 86400)
            return f"{purged} log records and {pruned} journal entries removed"

        services = [
            Service("housekeeping", Schedule.parse("every 1h"), housekeeping),
            Service("metrics", Schedule.parse("every 15s"), self._collect_metrics),
        ]

        def lag_sample(_now: dt.datetime) -> str:
            assert self.store is not None
            self.store.record_lag_sample()
            return ""

        services.append(Service("lag_history", Schedule.parse("every 1m"), lag_sample))
        return services

    def _start_health(self) -> None:
        from replicator.health import HealthServer, engine_check, threshold_check

        assert self.store is not None
        cfg = self.cfg
        health = HealthServer(cfg.health)
        health.add_check("staging", engine_check(self.store.engine))
        health.add_check("erp", self._erp_check)
        health.add_check("capture", self._capture_check)
        health.add_check(
            "lag", threshold_check(self._lag_seconds, cfg.health.max_lag_seconds, "lag seconds")
        )
        health.add_check(
            "heartbeat",
            threshold_check(self._heartbeat_age, cfg.health.max_heartbeat_age, "heartbeat age"),
        )
        # A shop that keeps failing is worth listing, but capture still works: not critical.
        health.add_check("breakers", self._breaker_check, critical=False)
        health.add_check("orders", self._orders_check)
        metrics.on_scrape(self._refresh_metrics)
        self._mount_routes(health)
        health.start()
        self.health = health
        log.info(
            "health_server_listening",
            url=f"http://{cfg.health.host}:{health.port}/",
            endpoints=["/healthz", "/readyz", "/metrics"],
        )
        self.on_stop.append(lambda: metrics.remove_on_scrape(self._refresh_metrics))

    # -- readiness checks and metrics (called from the health server's threads) -------------
    def _orders_check(self) -> tuple[bool, str]:
        """Not ready while a mapping no longer fits the ERP (capture is not affected)."""
        if self.order_service is None:
            return True, "order import off"
        ok, detail = self.order_service.readiness()
        return bool(ok), str(detail)

    def _erp_check(self) -> tuple[bool, str]:
        """Reach the ERP on a connection of its own, with a short timeout."""
        if self.cfg.erp.dialect != "postgresql":
            from replicator.db import make_engine

            eng = make_engine(self.cfg.erp.url, "health")
            try:
                with eng.connect() as c:
                    c.exec_driver_sql("SELECT 1")
            finally:
                eng.dispose()
            return True, "reachable"
        from replicator.db import pg_connect

        t0 = time.monotonic()
        with pg_connect(self.cfg.erp.url, "health", connect_timeout=2) as conn:
            conn.execute("SET statement_timeout = 2000")
            conn.execute("SELECT 1")
        return True, f"SELECT 1 in {(time.monotonic() - t0) * 1000:.0f} ms"

    def _capture_check(self) -> tuple[bool, str]:
        if self.source is None:
            return False, f"not capturing: {self.state.last_error or 'starting'}"
        return True, f"{self.cfg.capture.mode} capture streaming"

    def _progress(self) -> Any:
        return getattr(self.source, "progress", None)

    def _lag_seconds(self) -> float | None:
        p = self._progress()
        return None if p is None else p.lag_seconds

    def _heartbeat_age(self) -> float | None:
        p = self._progress()
        at = getattr(p, "last_heartbeat_at", None)
        return None if at is None else (dt.datetime.now(dt.UTC) - at).total_seconds()

    def _breaker_check(self) -> tuple[bool, str]:
        open_ = [s.name for s in self.state.services.values() if s.breaker_open]
        return (not open_), ("open: " + ", ".join(open_)) if open_ else "all closed"

    def _collect_metrics(self, _now: dt.datetime) -> str:
        """Figures that need a query (slot WAL on the ERP, orders by state in staging), collected
        in the background so that a scrape never waits on a database."""
        assert self.store is not None
        parts = []
        if self.cfg.capture.mode == "logical" and self.cfg.erp.dialect == "postgresql":
            from replicator.status import slot_lag

            for s in slot_lag(self.cfg):
                if s["slot"] == self.cfg.capture.slot:
                    metrics.SLOT_RETAINED_WAL_BYTES.labels("erp", s["slot"]).set(
                        s["retained_wal_bytes"] or 0
                    )
                    metrics.REPLICATION_LAG_BYTES.labels("erp", s["slot"]).set(s["lag_bytes"] or 0)
                    parts.append(f"slot retains {s['retained_wal_bytes']} bytes")
                    if s["warning"]:
                        log.warning("slot_at_risk", slot=s["slot"], warning=s["warning"])
        if self.order_service is not None:
            from sqlalchemy import func, select

            from replicator.orders.ledger import ledger_t

            with self.store.engine.connect() as conn:
                rows = conn.execute(
                    select(ledger_t.c.shop, ledger_t.c.state, func.count()).group_by(
                        ledger_t.c.shop, ledger_t.c.state
                    )
                ).all()
            for shop, state, n in rows:
                metrics.ORDERS.labels(shop, state).set(n)
            parts.append(f"{sum(r[2] for r in rows)} orders in the ledger")
        return ", ".join(parts)

    def _refresh_metrics(self) -> None:
        p = self._progress()
        source = getattr(self.source, "name", "erp")
        slot = self.cfg.capture.slot if self.cfg.capture.mode == "logical" else ""
        if p is not None:
            if p.lag_seconds is not None:
                metrics.REPLICATION_LAG_SECONDS.labels(source, slot).set(p.lag_seconds)
            if getattr(p, "last_applied_at", None) is not None:
                metrics.LAST_REPLICATION_TIMESTAMP.labels(source).set(p.last_applied_at.timestamp())
            table = getattr(p, "snapshot_table", None)
            if table is not None:
                metrics.SNAPSHOT_ROWS.labels(source, table, "done").set(p.snapshot_done)
                metrics.SNAPSHOT_ROWS.labels(source, table, "total").set(p.snapshot_total)
        age = self._heartbeat_age()
        if age is not None:
            metrics.HEARTBEAT_AGE.labels(source).set(age)
        for s in self.state.services.values():
            metrics.BREAKER_OPEN.labels(s.name).set(1 if s.breaker_open else 0)

    def cycle(self) -> None:
        """One turn of the main loop."""
        t_cycle = time.monotonic()
        now = time.monotonic()
        self.state.last_tick = now
        if self.source is None and now >= self._retry_at:
            self._connect()
        if self.source is not None:
            try:
                n = self.source.run_cycle(1.0, self.stop)
                self._summary_changes += n
                svc = self.state.service("capture")
                svc.last_run_at = dt.datetime.now(dt.UTC)
                svc.last_ok, svc.last_result = True, f"{n} changes"
                if time.monotonic() - self._last_heartbeat >= self.cfg.capture.heartbeat_interval:
                    self._last_heartbeat = time.monotonic()
                    self._while_alive(self.source.heartbeat)
            except RetryableError as exc:
                self._lost(exc)
            except FatalError:
                raise
            except Exception as exc:  # the staging store or the ERP went away mid-cycle
                if not _is_transient(exc):
                    raise
                self._lost(exc)
        else:
            self.stop.wait(min(1.0, max(0.0, self._retry_at - time.monotonic())))
        for hook in list(self.hooks):
            try:
                hook(self)
            except FatalError:
                raise
            except Exception as exc:
                log.exception("service_hook_failed", error=str(exc))
        self.state.last_tick = time.monotonic()
        if self.health is not None:
            self.health.tick()
        if self.notifier is not None:
            self.notifier.tick()
        if self._watchdog and time.monotonic() - self._last_watchdog >= self._watchdog / 3:
            self._last_watchdog = time.monotonic()
            sdnotify.watchdog_ping()
        self._mark_alive()
        metrics.LOOP_DURATION.observe(time.monotonic() - t_cycle)
        if time.monotonic() - self._last_summary >= 30:
            self._log_summary()

    def _mark_alive(self, force: bool = False) -> None:
        """Refresh the liveness mark that ``status`` reads (another process, maybe later)."""
        if self.store is None:
            return
        if not force and time.monotonic() - self._last_alive < ALIVE_INTERVAL:
            return
        self._last_alive = time.monotonic()
        try:
            self.store.mark_alive(
                os.getpid(), socket.gethostname(), self._started_at_utc, ALIVE_INTERVAL
            )
        except Exception as exc:  # staging away: capture reports that; status will say "stale"
            log.debug("liveness_not_saved", error=str(exc))

    def _while_alive(self, fn: Callable[[], Any]) -> Any:
        """Run a call that waits on the network in a worker thread, and keep the liveness clock
        and the systemd watchdog ticking meanwhile.

        Connects and heartbeats are bounded (connect_timeout, TCP keepalives and
        tcp_user_timeout), so waiting on them is the loop making progress, not the loop being
        stuck: a silent network partition must not make /healthz fail and a supervisor restart
        a daemon that is only waiting for the ERP. The ticking stops after a hard cap, so a call
        that never returns still turns liveness red.
        """
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed over to the loop below
                box["error"] = exc

        worker = threading.Thread(target=run, name="network-call", daemon=True)
        worker.start()
        cap = time.monotonic() + 3 * self.cfg.erp.connect_timeout + 60
        while worker.is_alive():
            worker.join(0.5)
            if time.monotonic() < cap:
                self.state.last_tick = time.monotonic()
                if self.health is not None:
                    self.health.tick()
                if self._watchdog:
                    sdnotify.watchdog_ping()
                self._mark_alive()
            if self.stop.is_set() and worker.is_alive():
                raise RetryableError("stopping while waiting on the network")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _connect(self) -> None:
        assert self.store is not None
        source = make_source(self.cfg, self.store)
        try:
            self._while_alive(source.start)
        except RetryableError as exc:
            source.close()
            self._lost(exc)
            return
        except FatalError:
            source.close()
            raise
        except Exception as exc:  # connection refused and friends: psycopg.OperationalError
            source.close()
            if _is_transient(exc):
                self._lost(exc)
                return
            import psycopg

            if isinstance(exc, psycopg.OperationalError):
                from replicator.db import access_refused, one_line

                cls = AccessError if access_refused(exc) else FatalError
                raise cls(
                    f"cannot capture from the ERP ({self.cfg.erp.redacted}): {one_line(exc)}"
                ) from exc
            raise
        self.source = source
        self.state.capture_connected = True
        self.state.last_error = ""
        self._backoff.reset()
        log.info("capture_started", source=source.name, mode=self.cfg.capture.mode)
        svc = self.state.service("capture")
        svc.last_run_at, svc.last_ok = dt.datetime.now(dt.UTC), True
        svc.last_result = f"streaming ({self.cfg.capture.mode})"
        self._save_capture_state()
        if self.notifier is not None:
            self.notifier.report("capture", source.name, True, "capturing again")
        if not self._ready_sent:
            # Start-up checks passed (config, staging, ERP, slot): tell systemd we are up.
            self._ready_sent = True
            sdnotify.ready(f"capturing {len(self.cfg.capture.tables)} table(s)")

    def _lost(self, exc: BaseException) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        self.state.capture_connected = False
        self.state.last_error = str(exc)
        delay = self._backoff.next()
        self._retry_at = time.monotonic() + delay
        svc = self.state.service("capture")
        svc.last_ok, svc.last_result = False, str(exc)
        svc.failures += 1
        log.warning("capture_interrupted", error=str(exc), retry_in=round(delay, 1))
        if self.notifier is not None:
            self.notifier.report("capture", "erp", False, str(exc))
        self._save_capture_state()

    def _log_summary(self) -> None:
        elapsed = time.monotonic() - self._last_summary
        progress: Any = getattr(self.source, "progress", None)
        log.info(
            "cycle_summary",
            changes=self._summary_changes,
            rate=round(self._summary_changes / elapsed, 1) if elapsed else 0,
            position=getattr(progress, "confirmed_lsn", None) and _lsn(progress.confirmed_lsn),
            lag_seconds=getattr(progress, "lag_seconds", None),
            connected=self.state.capture_connected,
        )
        sdnotify.status(
            f"{self._summary_changes} changes in {elapsed:.0f}s, lag "
            f"{'?' if getattr(progress, 'lag_seconds', None) is None else round(progress.lag_seconds, 2)}s"
            f"{'' if self.state.capture_connected else ', capture reconnecting'}"
        )
        self._summary_changes = 0
        self._last_summary = time.monotonic()
        self._save_capture_state()

    def _save_capture_state(self) -> None:
        if self.store is None:
            return
        st = self.state.service("capture")
        st.progress = (
            "" if self.state.capture_connected else f"reconnecting: {self.state.last_error}"
        )
        try:
            self.store.save_service(st)
        except Exception as exc:  # status output is best effort; capture goes on
            log.warning("service_state_not_saved", name="capture", error=str(exc))

    def reload(self) -> None:
        """SIGHUP: load the config again; a bad new config is logged and the old one stays."""
        sdnotify.reloading()
        if self._watcher is not None:
            self._watcher.loaded()  # SIGHUP: what is read now is what is in force
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error(
                "reload_rejected", reason=str(exc), hint="the previous configuration stays in force"
            )
            sdnotify.ready()
            return
        old = self.cfg
        self.cfg = new
        setup_logging(new.logging)
        restart_capture = (old.erp, old.capture, old.staging) != (new.erp, new.capture, new.staging)
        services_changed = restart_capture or (
            old.shops,
            old.orders,
            old.stock_push,
            old.invoice_push,
            old.schedules,
            old.notify,
        ) != (new.shops, new.orders, new.stock_push, new.invoice_push, new.schedules, new.notify)
        if restart_capture and self.source is not None:
            self.source.close()
            self.source = None
            self._retry_at = 0.0
        if new.staging != old.staging and self.store is not None:
            self.store.dispose()
            self.store = StagingStore(new.staging_url)
            self.store.setup()
            self._mark_alive(force=True)
            self.store.start_checkpointer()
        if services_changed and self.store is not None:
            self._rebuild_services()
        log.info(
            "config_reloaded", capture_restarted=restart_capture, services_rebuilt=services_changed
        )
        sdnotify.ready()

    def _rebuild_services(self) -> None:
        """Config reload: stop the services, build them from the new config, mount again."""
        from replicator.notify import Notifier

        self._stop_runners(self.cfg.daemon.shutdown_timeout / 2)
        self._services_stop = threading.Event()
        self.notifier = Notifier(self.cfg.notify, name=self.cfg.daemon.name)
        try:
            groups = self._build_services()
        except ConfigError as exc:  # e.g. a mapping that no longer fits the ERP
            log.error("services_not_rebuilt", reason=str(exc))
            return
        if self.health is not None:
            self._mount_routes(self.health)
        self._start_runners(groups)

    def shutdown(self) -> None:
        sdnotify.stopping()
        self.stop.set()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                self._watcher.stop()
        self._stop_runners(self.cfg.daemon.shutdown_timeout / 2)
        for fn in self.on_stop:
            with contextlib.suppress(Exception):
                fn()
        if self.source is not None:
            self.source.close()  # commits whole transactions it holds, rolls back a partial one
            self.source = None
        if self.health is not None:
            with contextlib.suppress(Exception):
                self.health.stop()
        if self.logstore is not None:
            from replicator.log import remove_sink

            remove_sink(self.logstore.sink)
            with contextlib.suppress(Exception):
                self.logstore.stop()
        if self.store is not None:
            if self._exit_code == 0:
                svc = self.state.service("capture")
                svc.last_ok, svc.last_result = True, "stopped"
                self.state.capture_connected, self.state.last_error = True, ""
                self._save_capture_state()
            with contextlib.suppress(Exception):
                self.store.mark_stopped(os.getpid(), socket.gethostname(), self._exit_code)
            self.store.dispose()


def _summary(d: Any) -> str:
    """One line from a service's summary dict (only the non-empty figures)."""
    if not isinstance(d, dict):
        return str(d)
    parts = [
        f"{k}={v}"
        for k, v in d.items()
        if v not in (None, 0, "", [], {}) and not isinstance(v, (dict, list))
    ]
    return ", ".join(parts)


def _lsn(v: int) -> str:
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def _is_transient(exc: BaseException) -> bool:
    import sqlite3

    import psycopg
    from sqlalchemy import exc as sa_exc

    from replicator.db import access_refused

    if access_refused(exc):
        return False
    return isinstance(
        exc,
        (
            psycopg.OperationalError,
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sqlite3.OperationalError,
            OSError,
            TimeoutError,
        ),
    )


def run_daemon(config_path: str) -> int:
    """Entry point of ``sync-daemon run``."""
    try:
        cfg = load_config(config_path)
    except ConfigError:
        raise
    setup_logging(cfg.logging)
    if cfg.ha.enabled:  # standby until the lease is ours (see replicator.ha)
        from replicator.ha import run_with_lease

        return run_with_lease(config_path, cfg)
    daemon = Daemon(config_path, cfg)
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except SyncError as exc:
        log.error("daemon_failed", error=str(exc))
        return exc.exit_code


def resync(cfg: Config) -> None:
    """Drop and recreate the slot and take a new snapshot (``sync-daemon resync``)."""
    store = StagingStore(cfg.staging_url)
    if cfg.capture.mode != "logical":
        raise FatalError("resync applies to capture.mode = 'logical'")
    from replicator.cdc.logical import LogicalSource

    src = LogicalSource(cfg, store)
    try:
        src.resync()
    finally:
        src.close()
        store.dispose()


def request_recopy(cfg: Config, table: str) -> str:
    """``sync-daemon resync --table T``: ask the daemon to copy one table again, online."""
    if cfg.capture.mode != "logical":
        raise ConfigError("resync --table applies to capture.mode = 'logical'")
    if table not in cfg.capture.tables:
        raise ConfigError(
            f"resync --table: {table!r} is not in capture.tables ({', '.join(cfg.capture.tables)})"
        )
    store = StagingStore(cfg.staging_url)
    try:
        store.request_recopy("erp", table)
    finally:
        store.dispose()
    return (
        f"resync: {table} will be copied again online while capture streams; "
        "`sync-daemon status` shows its progress (a stopped daemon starts it when it runs)"
    )
