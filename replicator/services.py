"""Scheduled services beside capture: order import, stock push, reconcile, sweeps, housekeeping.

Capture runs in the main loop (it must answer the walsender and signals promptly). Everything
that talks to a webshop can take seconds, so those services run one after another in a single
worker thread, each on its schedule (crontab, ``every 5m`` or continuous). One service failing
never stops the others: the failure is recorded in :class:`~replicator.state.ServiceState`
(status, the Manage page, ``/readyz`` breakers) and reported to the notifier as one incident per
service until it recovers.

A service is a name, a schedule and a function ``run(now) -> str`` that returns a one-line
result (the "canonical line" of that unit of work, also logged). ``progress()``, when given,
tells how far a long run is ("Updating product 825 of 12403").

Breakers: a service that failed ``BREAKER_AFTER`` times in a row opens its breaker and is only
probed every ``BREAKER_PROBE`` seconds (a shop that keeps failing is not hammered every second);
the first success closes it. A service can also report an open breaker of its own through
``breaker()`` (the order import: a shop whose import was cancelled after too many errors).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from replicator.notify import Notifier
from replicator.schedules import Schedule
from replicator.state import DaemonState, ServiceState

log = structlog.get_logger(__name__, service="services")

BREAKER_AFTER = 5
BREAKER_PROBE = dt.timedelta(seconds=60)


@dataclass
class Service:
    name: str
    schedule: Schedule
    run: Callable[[dt.datetime], str]
    progress: Callable[[], str] | None = None
    close: Callable[[], None] | None = None
    # True while the service's own breaker is open (e.g. a cancelled shop); checked after a run.
    breaker: Callable[[], bool] | None = None


class ServiceRunner:
    """Runs due services in one background thread until ``stop`` is set."""

    def __init__(
        self,
        services: list[Service],
        state: DaemonState,
        notifier: Notifier | None,
        stop: threading.Event,
        tick: float = 1.0,
        on_update: Callable[[ServiceState], None] | None = None,
    ) -> None:
        self.services = services
        self.on_update = on_update
        self.state = state
        self.notifier = notifier
        self.stop = stop
        self.tick = tick
        self._last: dict[str, dt.datetime | None] = {}
        started = dt.datetime.now().astimezone()
        for s in services:
            # Crontab services wait for their first slot; interval and continuous ones run now.
            self._last[s.name] = started if s.schedule.kind == "cron" else None
            st = state.service(s.name)
            st.next_run_at = s.schedule.next_after(started) if s.schedule.kind == "cron" else None
        self._thread = threading.Thread(target=self._loop, name="services", daemon=True)
        self._wake = threading.Event()
        self._now: set[str] = set()
        self._saved: dict[str, float] = {}

    def start(self) -> None:
        if self.services:
            self._thread.start()

    def run_now(self, name: str) -> None:
        """Run a service at the next opportunity, whatever its schedule says."""
        self._now.add(name)
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for s in self.services:
            if s.close is not None:
                try:
                    s.close()
                except Exception as exc:
                    log.warning("service_close_failed", name=s.name, error=str(exc))

    def _loop(self) -> None:
        while not self.stop.is_set():
            now = dt.datetime.now().astimezone()
            for s in self.services:
                if self.stop.is_set():
                    break
                forced = s.name in self._now
                if forced or self.due(s, now):
                    self._now.discard(s.name)
                    self.run_one(s)
            self._wake.wait(self.tick)
            self._wake.clear()

    def _set_breaker(self, s: Service, open_: bool) -> None:
        st = self.state.service(s.name)
        if open_ != st.breaker_open:
            log.log(
                40 if open_ else 20,
                "breaker_opened" if open_ else "breaker_closed",
                service=s.name,
                failures=st.failures,
            )
        st.breaker_open = open_

    def due(self, s: Service, now: dt.datetime) -> bool:
        """Due by its schedule; with its breaker open (failures in a row), once per probe."""
        last = self._last[s.name]
        if self.state.service(s.name).breaker_open and s.breaker is None and last is not None:
            return now - last >= BREAKER_PROBE
        return s.schedule.due(now, last)

    def run_one(self, s: Service) -> None:
        st = self.state.service(s.name)
        t0 = time.monotonic()
        started = dt.datetime.now().astimezone()
        try:
            # Whatever the run logs (importer, connectors, writer) carries this service's name.
            with structlog.contextvars.bound_contextvars(service=s.name):
                result = s.run(started)
            st.last_ok, st.last_result = True, result
            st.failures = 0
            self._set_breaker(s, bool(s.breaker and s.breaker()))
            if self.notifier is not None:
                self.notifier.report(s.name, s.name, True, result)
            if result and s.schedule.kind != "continuous":
                log.info(
                    "service_run",
                    service=s.name,
                    name=s.name,
                    result=result,
                    seconds=round(time.monotonic() - t0, 2),
                )
        except Exception as exc:
            st.last_ok, st.last_result = False, f"{type(exc).__name__}: {exc}"
            st.failures += 1
            self._set_breaker(s, st.failures >= BREAKER_AFTER or bool(s.breaker and s.breaker()))
            log.error(
                "service_failed",
                service=s.name,
                name=s.name,
                error=str(exc),
                failures=st.failures,
            )
            if self.notifier is not None:
                self.notifier.report(s.name, s.name, False, str(exc))
        finally:
            end = dt.datetime.now().astimezone()
            self._last[s.name] = end
            st.last_run_at = end.astimezone(dt.UTC)
            st.next_run_at = (
                end.astimezone(dt.UTC) + BREAKER_PROBE
                if st.breaker_open and s.breaker is None
                else s.schedule.next_after(end)
            )
            st.progress = s.progress() if s.progress else ""
            if self.on_update is not None and (
                s.schedule.kind != "continuous"
                or not st.last_ok
                or time.monotonic() - self._saved.get(s.name, 0) > 10
            ):
                # Continuous services are saved at most every 10 s, failures at once.
                self._saved[s.name] = time.monotonic()
                try:
                    self.on_update(st)
                except Exception as exc:
                    log.warning("service_state_not_saved", name=s.name, error=str(exc))
