"""The running parts of a daemon, built from a config: :func:`build` returns a :class:`Runtime`.

The parts, in the order they start:

* the staging store (made and waited for by the daemon, handed in here),
* the log store (log records kept in staging for the Manage page and ``sync-daemon logs``),
* the notifier (one incident per failing thing, mailed or posted),
* the capture supervisor (:mod:`replicator.cdc.supervisor`; the loop drives it),
* the scheduled services (:class:`ServiceSet`: order import, stock and invoice push, the stream
  sink, housekeeping, metrics collection, lag history), each group in its own thread,
* the HTTP server (:mod:`replicator.web.server`) with its named readiness checks
  (:mod:`replicator.ops.checks`) and the routes their owners provide (the ERP and shop webhook
  receivers, the Manage page),
* the config file watcher.

Each part takes a new config on reload and decides itself what to restart: capture restarts when
the ERP, capture or staging section changed; the services are rebuilt when a section they read
changed. :meth:`Runtime.close` stops the parts in reverse.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from replicator import metrics
from replicator.cdc.supervisor import CaptureSupervisor
from replicator.config import Config
from replicator.config.watch import ConfigWatcher
from replicator.errors import ConfigError
from replicator.log import add_sink, remove_sink
from replicator.logstore import LogStore
from replicator.notify import Notifier
from replicator.ops import gauges
from replicator.ops.checks import (
    breaker_check,
    capture_check,
    engine_check,
    erp_check,
    orders_check,
    threshold_check,
)
from replicator.schedules import Schedule
from replicator.services import Service, ServiceRunner
from replicator.staging import StagingStore
from replicator.state import DaemonState
from replicator.web.server import HttpServer, Request, Response

# The parts a config may leave out (order import, push, the stream sink, shop connectors, the
# Manage page) are imported where they are built: a daemon loads only what it runs, which keeps
# its start (and every test that starts one) short.
if TYPE_CHECKING:
    from replicator.connectors.base import ShopConnector
    from replicator.connectors.webhook import WebhookReceiver
    from replicator.orders.coordinator import OrderImportService
    from replicator.push.invoices import InvoicePushService
    from replicator.push.stock import StockPushService

log = structlog.get_logger(__name__, service="daemon")

__all__ = ["Runtime", "ServiceSet", "build"]


class ServiceSet:
    """The scheduled services a config asks for, one worker thread per group.

    Order import runs alone (a slow shop must not hold up push); stock and invoice push share a
    thread; the stream sink has its own (publishing must not wait behind a shop); housekeeping,
    metrics collection and lag history share the last one.
    """

    def __init__(
        self, cfg: Config, store: StagingStore, logstore: LogStore, stop: threading.Event
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.logstore = logstore
        # The daemon's stop: a continuous push run returns early when the daemon stops.
        self._daemon_stop = stop
        # Set on shutdown, and to rebuild on reload.
        self._stop = threading.Event()
        self.runners: list[ServiceRunner] = []
        self.groups: list[list[Service]] = []
        self.orders: OrderImportService | None = None
        self.stock: StockPushService | None = None
        self.invoices: InvoicePushService | None = None
        self.notifier: Notifier | None = None

    @staticmethod
    def changed(old: Config, new: Config) -> bool:
        """Whether a section the services read differs (capture's sections included: the
        services read the ERP and staging too)."""
        return (
            old.erp,
            old.capture,
            old.staging,
            old.shops,
            old.orders,
            old.stock_push,
            old.invoice_push,
            old.schedules,
            old.notify,
            old.health.metrics_interval,
        ) != (
            new.erp,
            new.capture,
            new.staging,
            new.shops,
            new.orders,
            new.stock_push,
            new.invoice_push,
            new.schedules,
            new.notify,
            new.health.metrics_interval,
        )

    def build(self) -> None:
        """Construct every service the config asks for (not started yet)."""
        cfg = self.cfg
        groups: list[list[Service]] = []
        connectors = self._connectors()
        if cfg.orders.enabled and cfg.shops:
            groups.append(self._order_services(connectors))
        push: list[Service] = []
        if cfg.stock_push is not None:
            push.extend(self._stock_services(connectors))
        if cfg.invoice_push is not None:
            from replicator.push.invoices import InvoicePushService  # noqa: PLC0415 - if configured

            invoices = InvoicePushService(cfg, self.store, connectors)
            self.invoices = invoices
            push.append(
                Service(
                    "invoices",
                    cfg.schedules.schedule("invoices"),
                    lambda _now: summary_line(invoices.run_cycle()),
                    progress=lambda: invoices.progress,
                    close=invoices.close,
                )
            )
        if push:
            groups.append(push)
        if cfg.stream is not None:  # its own thread: publishing must not wait behind a shop
            from replicator.stream.sink import stream_service  # noqa: PLC0415 - if configured

            groups.append([stream_service(cfg, self.store, self._stop)])
        groups.append(self._housekeeping_services())
        self.groups = groups

    def start(self, state: DaemonState, notifier: Notifier) -> None:
        self.notifier = notifier
        for group in self.groups:
            runner = ServiceRunner(
                group, state, notifier, self._stop, on_update=self.store.save_service
            )
            runner.start()
            self.runners.append(runner)

    def stop(self, timeout: float) -> None:
        """Stop the runners (each closes its services) and forget the built services."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            runner.join(max(0.1, deadline - time.monotonic()))
        self.runners = []
        self.groups = []
        self.stock = self.invoices = self.orders = None

    def reload(self, cfg: Config, store: StagingStore) -> None:
        """Take a new config: a fresh stop event; :meth:`build` makes the services again."""
        self.cfg, self.store = cfg, store
        self._stop = threading.Event()

    # -- the services ---------------------------------------------------------------------------
    def _connectors(self) -> dict[str, ShopConnector]:
        if not self.cfg.shops:
            return {}
        from replicator.connectors import make_connectors  # noqa: PLC0415 - if configured

        return make_connectors(self.cfg)

    def _order_services(self, connectors: dict[str, ShopConnector]) -> list[Service]:
        from replicator.orders.coordinator import OrderImportService  # noqa: PLC0415 - if configured

        orders = OrderImportService(self.cfg, connectors)
        self.orders = orders
        return [
            Service(
                "orders",
                self.cfg.schedules.schedule("orders"),
                lambda _now: self._order_cycle(orders),
                close=orders.close,
                # Open while a shop's import is cancelled (too many errors; only probed).
                breaker=lambda: any(st.cancelled for st in orders.ledger.shop_states()),
            ),
        ]

    def _order_cycle(self, orders: OrderImportService) -> str:
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

    def _stock_services(self, connectors: dict[str, ShopConnector]) -> list[Service]:
        assert self.cfg.stock_push is not None
        from replicator.push.stock import StockPushService  # noqa: PLC0415 - if configured

        stock = StockPushService(self.cfg, self.store, connectors)
        self.stock = stock
        stop = self._daemon_stop
        return [
            Service(
                "stock_push",
                Schedule.parse("continuous"),
                lambda _now: summary_line(stock.run_cycle(stop=stop)),
                progress=lambda: stock.progress,
                close=stock.close,
            ),
            Service(
                "reconcile",
                Schedule.parse(
                    self.cfg.stock_push.reconcile_schedule, "stock_push.reconcile_schedule"
                ),
                lambda now: summary_line(stock.reconcile(now, stop=stop)),
                progress=lambda: stock.progress,
            ),
        ]

    def _housekeeping_services(self) -> list[Service]:
        store = self.store

        def housekeeping(_now: dt.datetime) -> str:
            purged = self.logstore.purge()
            pruned = store.journal_prune(keep_seconds=7 * 86400)
            return f"{purged} log records and {pruned} journal entries removed"

        def collect_metrics(_now: dt.datetime) -> str:
            return gauges.collect_queried(self.cfg, store.engine, orders=self.orders is not None)

        def lag_sample(_now: dt.datetime) -> str:
            store.record_lag_sample()
            return ""

        return [
            Service("housekeeping", Schedule.parse("every 1h"), housekeeping),
            Service(
                "metrics",
                Schedule.parse(f"every {self.cfg.health.metrics_interval}s"),
                collect_metrics,
            ),
            Service("lag_history", Schedule.parse("every 1m"), lag_sample),
        ]


@dataclass(eq=False)  # a set of running things: compared by identity
class Runtime:
    """Everything one daemon runs beside its loop; built by :func:`build`."""

    cfg: Config
    config_path: str
    state: DaemonState
    store: StagingStore
    logstore: LogStore
    notifier: Notifier
    capture: CaptureSupervisor
    services: ServiceSet
    server: HttpServer | None = None
    watcher: ConfigWatcher | None = None
    _on_close: list[Callable[[], None]] = field(default_factory=list)

    # -- the HTTP server ------------------------------------------------------------------------
    def start_server(self) -> None:
        """Readiness checks, metrics refresher and routes on the daemon's HTTP server."""
        cfg = self.cfg
        server = HttpServer(cfg.health)
        server.add_check("staging", engine_check(self.store.engine))
        server.add_check("erp", lambda: erp_check(self.cfg))
        server.add_check("capture", lambda: capture_check(self.capture))
        server.add_check(
            "lag",
            threshold_check(self.capture.lag_seconds, cfg.health.max_lag_seconds, "lag seconds"),
        )
        server.add_check(
            "heartbeat",
            threshold_check(
                self.capture.heartbeat_age, cfg.health.max_heartbeat_age, "heartbeat age"
            ),
        )
        # A shop that keeps failing is worth listing, but capture still works: not critical.
        server.add_check("breakers", lambda: breaker_check(self.state), critical=False)
        server.add_check("orders", lambda: orders_check(self.services.orders))
        metrics.on_scrape(self._refresh_metrics)
        self._on_close.append(lambda: metrics.remove_on_scrape(self._refresh_metrics))
        self.mount_routes(server)
        server.start()
        self.server = server
        log.info(
            "health_server_listening",
            url=f"http://{cfg.health.host}:{server.port}/",
            endpoints=["/healthz", "/readyz", "/metrics"],
        )

    def _refresh_metrics(self) -> None:
        gauges.refresh_live(self.cfg, self.capture, self.state)

    def mount_routes(self, server: HttpServer) -> None:
        """Webhook receivers (shops, ERP) and the Manage page, as their owners build them."""
        cfg = self.cfg
        services = self.services
        if services.stock is not None or services.invoices is not None:
            from replicator.push.erp_webhook import (  # noqa: PLC0415 - if configured
                erp_webhook_secret,
                make_erp_webhook_handler,
            )

            secret = erp_webhook_secret(cfg)
            if secret:
                handler = make_erp_webhook_handler(
                    secret, stock=services.stock, invoices=services.invoices
                )
                server.add_route("GET", "/webhooks/erp", handler, public=True)
                server.add_route("POST", "/webhooks/erp", handler, public=True)
        if services.orders is not None:
            for shop in cfg.shops:
                if shop.kind != "webhook" and shop.webhook_secret is None:
                    continue
                from replicator.connectors import (  # noqa: PLC0415 - if configured
                    make_webhook_receiver,
                )

                receiver = make_webhook_receiver(shop, services.orders.store_webhook_delivery)
                server.add_route(
                    "POST",
                    f"/webhooks/shop/{shop.name}",
                    _shop_route(receiver),
                    public=True,
                    max_body=receiver.max_body,
                )
        from replicator.web.app import WebContext, mount  # noqa: PLC0415 - with the server only

        mount(
            server,
            WebContext(
                config=cfg,
                staging_engine=self.store.engine,
                daemon_state=lambda: self.state,
                store=self.store,
                logstore=self.logstore,
                importer=services.orders.actions if services.orders else None,
            ),
        )

    # -- reload ---------------------------------------------------------------------------------
    def reload(self, cfg: Config) -> tuple[bool, bool]:
        """Each part takes ``cfg``; returns (capture restarted, services rebuilt)."""
        old, self.cfg = self.cfg, cfg
        restart_capture = self.capture.reload(cfg, self.store)
        if cfg.staging != old.staging:
            self.store.dispose()
            self.store = StagingStore(cfg.staging_url)
            self.store.setup()
            self.store.start_checkpointer()
            self.capture.store = self.store
        rebuild = ServiceSet.changed(old, cfg)
        if rebuild:
            self._rebuild_services()
        return restart_capture, rebuild

    def _rebuild_services(self) -> None:
        """Stop the services, build them from the new config, mount their routes again."""
        self.services.stop(self.cfg.daemon.shutdown_timeout / 2)
        self.services.reload(self.cfg, self.store)
        self.notifier = Notifier(self.cfg.notify, name=self.cfg.daemon.name)
        self.capture.notifier = self.notifier
        try:
            self.services.build()
        except ConfigError as exc:  # e.g. a mapping that no longer fits the ERP
            log.error("services_not_rebuilt", reason=str(exc))
            return
        if self.server is not None:
            self.mount_routes(self.server)
        self.services.start(self.state, self.notifier)

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every part but the staging store (the daemon writes its last mark there)."""
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                self.watcher.stop()
        self.services.stop(self.cfg.daemon.shutdown_timeout / 2)
        for fn in self._on_close:
            with contextlib.suppress(Exception):
                fn()
        self.capture.close()  # commits whole transactions it holds, rolls back a partial one
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
        remove_sink(self.logstore.sink)
        with contextlib.suppress(Exception):
            self.logstore.stop()


def _shop_route(receiver: WebhookReceiver) -> Callable[[Request], Response]:
    def route(req: Request) -> Response:
        status, body = receiver.handle(req.headers, req.body)
        return Response.json(body, status)

    return route


def build(
    cfg: Config,
    config_path: str,
    store: StagingStore,
    state: DaemonState,
    stop: threading.Event,
    keepalive: Callable[[], None],
) -> Runtime:
    """Start every part ``cfg`` asks for around a set-up staging ``store``.

    On a failure the parts started so far are stopped again before the error goes up.
    """
    logstore = LogStore(store.engine, cfg.logging.retention_days)
    logstore.start()
    add_sink(logstore.sink)
    notifier = Notifier(cfg.notify, name=cfg.daemon.name)
    services = ServiceSet(cfg, store, logstore, stop)
    rt = Runtime(
        cfg=cfg,
        config_path=config_path,
        state=state,
        store=store,
        logstore=logstore,
        notifier=notifier,
        capture=CaptureSupervisor(cfg, store, state, stop, keepalive, notifier),
        services=services,
    )
    try:
        services.build()
        if cfg.health.enabled:
            rt.start_server()
        services.start(state, notifier)
        watcher = ConfigWatcher(config_path)
        if watcher.start():
            rt.watcher = watcher
    except BaseException:
        rt.close()
        raise
    return rt


def summary_line(d: object) -> str:
    """One line from a service's summary dict (only the non-empty figures)."""
    if not isinstance(d, dict):
        return str(d)
    parts = [
        f"{k}={v}"
        for k, v in d.items()
        if v not in (None, 0, "", [], {}) and not isinstance(v, (dict, list))
    ]
    return ", ".join(parts)
