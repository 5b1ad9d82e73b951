"""Readiness: named checks, and the runner that bounds each one by a timeout.

Patroni's split (``patroni/api.py``): liveness means "the loop is not overdue" (the HTTP server
answers it from the loop's tick); readiness means "these named checks pass". Each check is a
function ``fn() -> (ok, detail)`` that only reads: ``SELECT 1`` on a database, a figure compared
with its limit, the state the daemon keeps. :class:`Check` runs one in its own worker thread
with a timeout, so a stuck database cannot hang ``/readyz``; the server
(:mod:`replicator.web.server`) registers and serves them, :mod:`replicator.runtime` picks which
ones a daemon has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from replicator.config import Config
from replicator.db import make_engine, pg_connect, reading
from replicator.log import redact
from replicator.state import DaemonState

if TYPE_CHECKING:  # typing only: the supervisor's module imports capture, which is not needed here
    from replicator.cdc.supervisor import CaptureSupervisor
    from replicator.orders.coordinator import OrderImportService

__all__ = [
    "Check",
    "CheckFn",
    "breaker_check",
    "capture_check",
    "engine_check",
    "erp_check",
    "orders_check",
    "threshold_check",
]

CheckFn = Callable[[], tuple[bool, str]]


class _Run:
    """One execution of a check in its worker thread; shared by concurrent probes."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.ok = False
        self.detail = ""
        self.ms = 0.0


@dataclass
class Check:
    """A named readiness check. At most one run of it is in flight at any time."""

    name: str
    fn: CheckFn
    critical: bool
    timeout: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _run: _Run | None = field(default=None, repr=False)

    def start(self) -> _Run:
        """Start a run, or join the one still in flight (a stuck check never piles up threads)."""
        with self._lock:
            if self._run is not None and not self._run.done.is_set():
                return self._run
            run = self._run = _Run()
        threading.Thread(
            target=self._execute, args=(run,), name=f"readyz-{self.name}", daemon=True
        ).start()
        return run

    def _execute(self, run: _Run) -> None:
        try:
            result = self.fn()
            ok, detail = bool(result[0]), str(result[1])
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        run.ok, run.detail = ok, redact(detail)
        run.ms = (time.monotonic() - run.started) * 1000
        run.done.set()

    def result(self, run: _Run) -> dict[str, Any]:
        remaining = run.started + self.timeout - time.monotonic()
        if run.done.wait(max(0.0, remaining)):
            ok, detail, ms = run.ok, run.detail, run.ms
        else:
            ok, detail = False, f"timed out after {self.timeout:g}s"
            ms = (time.monotonic() - run.started) * 1000
        return {
            "name": self.name,
            "ok": ok,
            "critical": self.critical,
            "detail": detail,
            "ms": round(ms, 1),
        }


def engine_check(engine: sa.Engine) -> CheckFn:
    """A readiness check that runs ``SELECT 1`` on ``engine`` (staging store, ERP)."""

    def check() -> tuple[bool, str]:
        started = time.monotonic()
        with reading(engine) as conn:
            conn.execute(sa.text("SELECT 1"))
        return True, f"SELECT 1 in {(time.monotonic() - started) * 1000:.0f} ms"

    return check


def threshold_check(value: Callable[[], float | None], limit: float, what: str) -> CheckFn:
    """A readiness check that fails when ``value()`` exceeds ``limit`` (e.g. lag seconds).

    ``value()`` returning None (nothing measured yet) fails with "no <what> measured yet".
    """

    def check() -> tuple[bool, str]:
        v = value()
        if v is None:
            return False, f"no {what} measured yet"
        return v <= limit, f"{what} {v:.1f} (limit {limit:g})"

    return check


def erp_check(cfg: Config) -> tuple[bool, str]:
    """Reach the ERP on a connection of its own, with a short timeout."""
    if cfg.erp.dialect != "postgresql":
        eng = make_engine(cfg.erp.url, "health")
        try:
            with eng.connect() as c:
                c.exec_driver_sql("SELECT 1")
        finally:
            eng.dispose()
        return True, "reachable"
    t0 = time.monotonic()
    with pg_connect(cfg.erp.url, "health", connect_timeout=2) as conn:
        conn.execute("SET statement_timeout = 2000")
        conn.execute("SELECT 1")
    return True, f"SELECT 1 in {(time.monotonic() - t0) * 1000:.0f} ms"


def capture_check(capture: CaptureSupervisor) -> tuple[bool, str]:
    """Ready while a capture source streams."""
    if capture.source is None:
        return False, f"not capturing: {capture.state.last_error or 'starting'}"
    return True, f"{capture.cfg.capture.mode} capture streaming"


def breaker_check(state: DaemonState) -> tuple[bool, str]:
    """Services whose breaker is open (a shop that keeps failing)."""
    open_ = [s.name for s in state.services.values() if s.breaker_open]
    return (not open_), ("open: " + ", ".join(open_)) if open_ else "all closed"


def orders_check(orders: OrderImportService | None) -> tuple[bool, str]:
    """Not ready while a mapping no longer fits the ERP (capture is not affected)."""
    if orders is None:
        return True, "order import off"
    ok, detail = orders.readiness()
    return bool(ok), str(detail)
