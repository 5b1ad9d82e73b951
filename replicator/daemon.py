"""The daemon: the main loop and its life cycle, in the Patroni style.

Signal handlers only set flags. The loop is: reload if SIGHUP arrived (or the config file
changed), run one cycle (capture runs continuously, in slices of about a second; the scheduled
services run in their own threads), tick the liveness clock, repeat. Shutdown always runs in
``finally``: the capture source commits the batch of whole source transactions it holds (or
rolls back a partial one), connections close, and the process exits within
``daemon.shutdown_timeout`` seconds.

What runs is built from the config by :func:`replicator.runtime.build`; capture is supervised by
:mod:`replicator.cdc.supervisor`. Failures are classified: a :class:`RetryableError` (connection
lost, server restarting) closes the source and reconnects with capped exponential backoff and
jitter; a :class:`FatalError` (slot gone, bad schema, a second daemon) stops the daemon with the
reason and its exit code (3 for the source, 4 for refused access; see :mod:`replicator.errors`),
which the systemd unit does not restart in a loop (``RestartPreventExitStatus``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

from replicator import metrics, sdnotify
from replicator.cdc.supervisor import save_capture_state
from replicator.config import Config, load_config, warn_if_world_readable
from replicator.errors import ConfigError, FatalError, RetryableError, SyncError
from replicator.ha import run_with_lease
from replicator.log import setup_logging
from replicator.runtime import Runtime, build
from replicator.staging import StagingStore
from replicator.state import DaemonState
from replicator.web.server import HttpServer

log = structlog.get_logger(__name__, service="daemon")

# How often the main loop refreshes its liveness mark in staging (``status`` reads it).
ALIVE_INTERVAL = 5.0


class Daemon:
    """One sync-daemon process."""

    def __init__(self, config_path: str, cfg: Config | None = None) -> None:
        self.config_path = config_path
        self.cfg = cfg or load_config(config_path)
        self.stop = threading.Event()
        self._reload = threading.Event()
        self.state = DaemonState()
        self.store: StagingStore | None = None
        self.runtime: Runtime | None = None
        # Per-cycle work added from outside (the HA lease adds its readiness check this way).
        self.hooks: list[Callable[[Daemon], None]] = []
        self._watchdog = sdnotify.watchdog_interval()
        self._last_watchdog = 0.0
        self._last_alive = 0.0
        self._started_at_utc = dt.datetime.now(dt.UTC)
        self._exit_code = 1  # until run() says otherwise: a crash is not a clean stop

    @property
    def health(self) -> HttpServer | None:
        """The HTTP server, once it listens."""
        return None if self.runtime is None else self.runtime.server

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
            self._wait_for_staging(self.store)
            if not self.stop.is_set():
                self._mark_alive(force=True)
                self.store.start_checkpointer()
                self.runtime = build(
                    cfg, self.config_path, self.store, self.state, self.stop, self._keepalive
                )
            while not self.stop.is_set():
                if self._reload.is_set() or self._config_changed():
                    self._reload.clear()
                    self.reload()
                self.cycle()
        except FatalError as exc:
            log.error("daemon_stopped_fatal", error=str(exc), exit_code=exc.exit_code)
            code = exc.exit_code
            self._stopped_fatal(exc)
        except BaseException:
            code = 1  # recorded as the exit of a crash, then raised on
            raise
        finally:
            self._exit_code = code
            self.shutdown()
        log.info("daemon_stopped", exit_code=code)
        return code

    def _wait_for_staging(self, store: StagingStore) -> None:
        """Set the staging store up, waiting (with backoff) while its server does not answer —
        e.g. a staging PostgreSQL that starts after us at boot. Nothing is read from the ERP, an
        inbox folder, a shop or a webhook before it answers, so nothing is taken that could not
        be stored. Returns early when a stop is requested."""
        delay = 1.0
        while True:
            try:
                store.setup()
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

    def cycle(self) -> None:
        """One turn of the main loop."""
        t_cycle = time.monotonic()
        self.state.last_tick = t_cycle
        rt = self.runtime
        if rt is not None:
            rt.capture.run_slice()
        for hook in list(self.hooks):
            try:
                hook(self)
            except FatalError:
                raise
            except Exception as exc:
                log.exception("service_hook_failed", error=str(exc))
        self.state.last_tick = time.monotonic()
        if rt is not None and rt.server is not None:
            rt.server.tick()
        if rt is not None:
            rt.notifier.tick()
        if self._watchdog and time.monotonic() - self._last_watchdog >= self._watchdog / 3:
            self._last_watchdog = time.monotonic()
            sdnotify.watchdog_ping()
        self._mark_alive()
        metrics.LOOP_DURATION.observe(time.monotonic() - t_cycle)
        if rt is not None:
            rt.capture.log_summary_if_due()

    def _keepalive(self) -> None:
        """The loop waits on the network (connect, heartbeat): that is progress, not a hang."""
        self.state.last_tick = time.monotonic()
        if self.health is not None:
            self.health.tick()
        if self._watchdog:
            sdnotify.watchdog_ping()
        self._mark_alive()

    def _mark_alive(self, force: bool = False) -> None:
        """Refresh the liveness mark that ``status`` reads (another process, maybe later)."""
        store = self._store()
        if store is None:
            return
        if not force and time.monotonic() - self._last_alive < ALIVE_INTERVAL:
            return
        self._last_alive = time.monotonic()
        try:
            store.mark_alive(
                os.getpid(), socket.gethostname(), self._started_at_utc, ALIVE_INTERVAL
            )
        except Exception as exc:  # staging away: capture reports that; status will say "stale"
            log.debug("liveness_not_saved", error=str(exc))

    def _store(self) -> StagingStore | None:
        """The staging store in use (a reload may have replaced the one the daemon made)."""
        return self.runtime.store if self.runtime is not None else self.store

    def _config_changed(self) -> bool:
        rt = self.runtime
        return rt is not None and rt.watcher is not None and rt.watcher.changed()

    def reload(self) -> None:
        """SIGHUP: load the config again; a bad new config is logged and the old one stays."""
        sdnotify.reloading()
        rt = self.runtime
        if rt is not None and rt.watcher is not None:
            rt.watcher.loaded()  # SIGHUP: what is read now is what is in force
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error(
                "reload_rejected", reason=str(exc), hint="the previous configuration stays in force"
            )
            sdnotify.ready()
            return
        self.cfg = new
        setup_logging(new.logging)
        restarted = rebuilt = False
        if rt is not None:
            store = rt.store
            restarted, rebuilt = rt.reload(new)
            if rt.store is not store:  # a new staging store: say at once that we live there
                self._mark_alive(force=True)
        log.info("config_reloaded", capture_restarted=restarted, services_rebuilt=rebuilt)
        sdnotify.ready()

    def _stopped_fatal(self, exc: FatalError) -> None:
        self.state.last_error = str(exc)
        if self.runtime is not None:
            self.runtime.capture.stopped_fatal(exc)
            return
        svc = self.state.service("capture")
        svc.last_run_at, svc.last_ok, svc.last_result = (
            dt.datetime.now(dt.UTC),
            False,
            f"stopped: {exc}",
        )
        if self.store is not None:
            save_capture_state(self.store, self.state)

    def shutdown(self) -> None:
        sdnotify.stopping()
        self.stop.set()
        if self.runtime is not None:
            self.runtime.close()
        store = self._store()
        if store is None:
            return
        if self._exit_code == 0:
            svc = self.state.service("capture")
            svc.last_ok, svc.last_result = True, "stopped"
            self.state.capture_connected, self.state.last_error = True, ""
            save_capture_state(store, self.state)
        with contextlib.suppress(Exception):  # staging away: status says "not responding"
            store.mark_stopped(os.getpid(), socket.gethostname(), self._exit_code)
        store.dispose()


def run_daemon(config_path: str) -> int:
    """Entry point of ``sync-daemon run``."""
    cfg = load_config(config_path)
    setup_logging(cfg.logging)
    if cfg.ha.enabled:  # standby until the lease is ours (see replicator.ha)
        return run_with_lease(config_path, cfg)
    daemon = Daemon(config_path, cfg)
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except SyncError as exc:
        log.error("daemon_failed", error=str(exc))
        return exc.exit_code
