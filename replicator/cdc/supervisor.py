"""Capture supervision: connect, stream in slices, heartbeat, and reconnect after a loss.

The main loop calls :meth:`CaptureSupervisor.run_slice` once per cycle. It connects when no
source runs and the backoff has passed, runs the source for about a second, writes the heartbeat
when due, and turns a lost connection into a retry: a :class:`RetryableError` (or a driver error
that only says "cannot reach", see :func:`_is_transient`) closes the source and schedules the
next connect with capped exponential backoff and full jitter. A :class:`FatalError` goes up to
the loop, which stops the daemon with its exit code.

Calls that wait on the network (connect, heartbeat) run in a worker thread while the loop's
``keepalive`` keeps liveness and the systemd watchdog ticking (see :meth:`while_alive`). The
supervisor also keeps what status shows for the "capture" service, reports capture incidents to
the notifier, and logs one summary line every 30 seconds.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import structlog

from replicator import sdnotify
from replicator.cdc import make_source
from replicator.cdc.base import CaptureSource, Progress
from replicator.config import Config
from replicator.db import one_line
from replicator.errors import AccessError, FatalError, RetryableError
from replicator.errors_map import classify, is_access_refused
from replicator.notify import Notifier
from replicator.staging import StagingStore
from replicator.state import DaemonState

# Bound to the daemon's service: these are the records the daemon's loop always wrote.
log = structlog.get_logger(__name__, service="daemon")

T = TypeVar("T")

# How often the loop logs its one-line summary.
SUMMARY_INTERVAL = 30.0


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 1.0, cap: float = 60.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.base * 2 ** (self.attempt - 1))) + 0.1

    def reset(self) -> None:
        self.attempt = 0


class CaptureSupervisor:
    """Keeps one capture source running for the daemon's loop."""

    def __init__(
        self,
        cfg: Config,
        store: StagingStore,
        state: DaemonState,
        stop: threading.Event,
        keepalive: Callable[[], None],
        notifier: Notifier | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.state = state
        self.stop = stop
        self.notifier = notifier
        self.source: CaptureSource | None = None
        self._keepalive = keepalive
        self._backoff = Backoff()
        self._retry_at = 0.0
        self._last_heartbeat = 0.0
        self._last_summary = time.monotonic()
        self._summary_changes = 0
        self._ready_sent = False

    # -- what readiness and metrics read ------------------------------------------------------
    @property
    def progress(self) -> Progress | None:
        return None if self.source is None else self.source.progress

    @property
    def source_name(self) -> str:
        return "erp" if self.source is None else self.source.name

    def lag_seconds(self) -> float | None:
        p = self.progress
        return None if p is None else p.lag_seconds

    def heartbeat_age(self) -> float | None:
        p = self.progress
        at = None if p is None else p.last_heartbeat_at
        return None if at is None else (dt.datetime.now(dt.UTC) - at).total_seconds()

    # -- one slice of the loop ----------------------------------------------------------------
    def run_slice(self) -> None:
        """Connect if due, then capture for about a second (or wait out the backoff)."""
        if self.source is None and time.monotonic() >= self._retry_at:
            self._connect()
        if self.source is None:
            self.stop.wait(min(1.0, max(0.0, self._retry_at - time.monotonic())))
            return
        try:
            n = self.source.run_cycle(1.0, self.stop)
            self._summary_changes += n
            svc = self.state.service("capture")
            svc.last_run_at = dt.datetime.now(dt.UTC)
            svc.last_ok, svc.last_result = True, f"{n} changes"
            if time.monotonic() - self._last_heartbeat >= self.cfg.capture.heartbeat_interval:
                self._last_heartbeat = time.monotonic()
                self.while_alive(self.source.heartbeat)
        except RetryableError as exc:
            self._lost(exc)
        except FatalError:
            raise
        except Exception as exc:  # the staging store or the ERP went away mid-cycle
            if not _is_transient(exc):
                raise
            self._lost(exc)

    def while_alive(self, fn: Callable[[], T]) -> T | None:
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
                self._keepalive()
            if self.stop.is_set() and worker.is_alive():
                raise RetryableError("stopping while waiting on the network")
        if "error" in box:
            raise box["error"]
        result: T | None = box.get("result")
        return result

    def _connect(self) -> None:
        source = make_source(self.cfg, self.store)
        try:
            self.while_alive(source.start)
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
            if isinstance(exc, psycopg.OperationalError):
                cls = AccessError if is_access_refused(exc) else FatalError
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
        self.save_state()
        if self.notifier is not None:
            self.notifier.report("capture", source.name, True, "capturing again")
        if not self._ready_sent:
            # Start-up checks passed (config, staging, ERP, slot): tell systemd we are up.
            self._ready_sent = True
            sdnotify.ready(f"capturing {len(self.cfg.capture.tables)} table(s)")

    def _lost(self, exc: BaseException) -> None:
        self._close_source()
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
        self.save_state()

    # -- life cycle -----------------------------------------------------------------------------
    def reload(self, cfg: Config, store: StagingStore) -> bool:
        """Take a new config; restart capture (at once, no backoff) when the ERP, capture or
        staging section changed. Returns whether it restarts."""
        old, self.cfg, self.store = self.cfg, cfg, store
        restart = (old.erp, old.capture, old.staging) != (cfg.erp, cfg.capture, cfg.staging)
        if restart and self.source is not None:
            self._close_source()
            self._retry_at = 0.0
        return restart

    def stopped_fatal(self, exc: FatalError) -> None:
        """The daemon stops on ``exc``: status and the notifier say so."""
        self.state.last_error = str(exc)
        svc = self.state.service("capture")
        svc.last_run_at, svc.last_ok, svc.last_result = (
            dt.datetime.now(dt.UTC),
            False,
            f"stopped: {exc}",
        )
        self.save_state()
        if self.notifier is not None:
            self.notifier.report("capture", "erp", False, f"stopped: {exc}")
            self.notifier.tick()

    def stopped_clean(self) -> None:
        """A clean stop: status shows capture as stopped, not as failing."""
        svc = self.state.service("capture")
        svc.last_ok, svc.last_result = True, "stopped"
        self.state.capture_connected, self.state.last_error = True, ""
        self.save_state()

    def close(self) -> None:
        """Commit the whole transactions the source holds, roll back a partial one, close."""
        self._close_source()

    def _close_source(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None

    # -- what status shows --------------------------------------------------------------------
    def log_summary_if_due(self) -> None:
        if time.monotonic() - self._last_summary >= SUMMARY_INTERVAL:
            self.log_summary()

    def log_summary(self) -> None:
        """One human-readable line per interval: changes, rate, position, lag."""
        elapsed = time.monotonic() - self._last_summary
        progress = self.progress
        lag = None if progress is None else progress.lag_seconds
        log.info(
            "cycle_summary",
            changes=self._summary_changes,
            rate=round(self._summary_changes / elapsed, 1) if elapsed else 0,
            position=progress.confirmed_lsn and lsn_text(progress.confirmed_lsn)
            if progress is not None
            else None,
            lag_seconds=lag,
            connected=self.state.capture_connected,
        )
        sdnotify.status(
            f"{self._summary_changes} changes in {elapsed:.0f}s, lag "
            f"{'?' if lag is None else round(lag, 2)}s"
            f"{'' if self.state.capture_connected else ', capture reconnecting'}"
        )
        self._summary_changes = 0
        self._last_summary = time.monotonic()
        self.save_state()

    def save_state(self) -> None:
        save_capture_state(self.store, self.state)


def save_capture_state(store: StagingStore, state: DaemonState) -> None:
    """Save the "capture" service's state for ``status`` (best effort; capture goes on)."""
    st = state.service("capture")
    st.progress = "" if state.capture_connected else f"reconnecting: {state.last_error}"
    try:
        store.save_service(st)
    except Exception as exc:  # status output is best effort; capture goes on
        log.warning("service_state_not_saved", name="capture", error=str(exc))


def lsn_text(v: int) -> str:
    """An LSN as PostgreSQL writes it (``16/B374D848``)."""
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def _is_transient(exc: BaseException) -> bool:
    """A driver error that means "cannot reach right now" (retry), not "refused" (stop)."""
    return issubclass(classify(exc), RetryableError)
