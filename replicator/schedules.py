"""When each service runs: crontab expressions, fixed intervals, or continuously.

A schedule expression (``[schedules]`` in the config) is one of:

* ``continuous`` — the service runs on every loop cycle (capture streams all the time);
* ``every 5m`` / ``every 30s`` / ``every 2 hours`` / ``every day`` — a fixed interval measured
  from the end of the previous run;
* a five-field crontab expression (``*/5 * * * *``, ``30 2 * * *``, ``0 8-18 * * 1-5``) or one
  of ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``, evaluated with croniter in
  the time zone of the datetimes passed in (the daemon passes local time, which is what an
  operator means by "at 02:30").

:meth:`Schedule.parse` raises :class:`~replicator.errors.ConfigError` naming the config key;
:meth:`Schedule.describe` says the schedule in words for ``status`` and the Manage page.

Wiring (for ``replicator/daemon.py``)::

    from replicator.schedules import Scheduler

    scheduler = Scheduler(cfg.schedules.all())        # {service: Schedule}
    while running:
        now = datetime.now().astimezone()
        for service in scheduler.due(now):             # in config order
            run_service(service)
            scheduler.done(service, datetime.now().astimezone())
        scheduler.next_run("orders")                   # for status output

A crontab schedule first fires at its next slot after the daemon started (a restart at 10:00
does not replay the 02:30 sweep); an interval schedule runs at once and then every interval.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from croniter import croniter

from replicator.errors import ConfigError

__all__ = ["Schedule", "Scheduler"]

_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}
_EVERY = re.compile(r"^every\s+(?:(\d+)\s*)?([a-z]+)$")
_ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_DAY_NAMES = {d[:3].lower(): i for i, d in enumerate(_DAYS[:7])}
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]  # fmt: skip


def _plural(n: int, unit: str) -> str:
    return f"every {unit}" if n == 1 else f"every {n} {unit}s"


def _describe_interval(seconds: int) -> str:
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds % size == 0:
            return _plural(seconds // size, unit)
    return _plural(seconds, "second")


@dataclass(frozen=True)
class Schedule:
    """One parsed schedule expression."""

    expr: str
    kind: Literal["continuous", "interval", "cron"]
    interval: timedelta | None = None
    cron: str | None = None  # the five-field form (aliases expanded)

    @classmethod
    def parse(cls, expr: str, key: str = "schedule") -> Schedule:
        """Parse ``expr``; a bad one raises ConfigError naming ``key`` (e.g. schedules.orders)."""
        try:
            return cls.from_text(expr)
        except ValueError as exc:
            raise ConfigError(f"{key} = {expr!r}: {exc}") from None

    @classmethod
    def from_text(cls, expr: str) -> Schedule:
        """Parse ``expr``; a bad one raises ValueError saying what is wrong (no key named)."""
        text = " ".join(str(expr).split()).lower()
        if not text:
            raise ValueError('empty; use a crontab expression, "every 5m" or "continuous"')
        if text == "continuous":
            return cls(expr, "continuous")
        m = _EVERY.match(text)
        if m:
            count = int(m.group(1) or 1)
            unit = _UNITS.get(m.group(2))
            if unit is None:
                raise ValueError(f"unknown unit {m.group(2)!r}; use s, m, h or d (every 5m)")
            if count <= 0:
                raise ValueError("the interval must be positive")
            return cls(expr, "interval", interval=timedelta(seconds=count * unit))
        cron = _ALIASES.get(text, text)
        if len(cron.split()) != 5:
            raise ValueError(
                "not a schedule: use five crontab fields (minute hour day month weekday, "
                'e.g. "*/5 * * * *"), "every 5m" or "continuous"'
            )
        if not croniter.is_valid(cron):
            raise ValueError("invalid crontab expression (a field is out of range or malformed)")
        return cls(expr, "cron", cron=cron)

    # -- timing -------------------------------------------------------------------------------

    def next_after(self, after: datetime) -> datetime | None:
        """The first run strictly after ``after``; ``None`` for a continuous service."""
        if self.kind == "continuous":
            return None
        if self.kind == "interval":
            assert self.interval is not None
            return after + self.interval
        assert self.cron is not None
        nxt: datetime = croniter(self.cron, after).get_next(datetime)
        return nxt

    def next_runs(self, n: int, after: datetime) -> list[datetime]:
        """The next ``n`` run times after ``after`` (empty for a continuous service)."""
        out: list[datetime] = []
        at = after
        while len(out) < n:
            nxt = self.next_after(at)
            if nxt is None:
                break
            out.append(nxt)
            at = nxt
        return out

    def due(self, now: datetime, last_run: datetime | None = None) -> bool:
        """Whether the service should run at ``now`` given when it last ran.

        Continuous: always. Interval: never ran, or the interval passed since ``last_run``.
        Crontab: a slot lies in ``(last_run, now]``; without ``last_run``, when ``now`` falls in
        a matching minute.
        """
        if self.kind == "continuous":
            return True
        if self.kind == "interval":
            assert self.interval is not None
            return last_run is None or now - last_run >= self.interval
        since = last_run if last_run is not None else now.replace(second=0, microsecond=0)
        if last_run is None:
            since -= timedelta(microseconds=1)
        nxt = self.next_after(since)
        return nxt is not None and nxt <= now

    # -- words --------------------------------------------------------------------------------

    def describe(self) -> str:
        """The schedule in words, best effort ("every 5 minutes", "at 02:30 every day")."""
        if self.kind == "continuous":
            return "continuously"
        if self.kind == "interval":
            assert self.interval is not None
            return _describe_interval(int(self.interval.total_seconds()))
        assert self.cron is not None
        return _describe_cron(self.cron) or f"cron {self.cron}"


def _describe_days(dom: str, month: str, dow: str) -> str | None:
    if dom == "*" and month == "*" and dow == "*":
        return "every day"
    if dom == "*" and month == "*":
        if dow in ("1-5", "mon-fri"):
            return "on weekdays"
        if dow in ("0,6", "6,0", "sat,sun", "sun,sat"):
            return "on weekends"
        names = []
        for part in dow.split(","):
            idx = _DAY_NAMES.get(part) if not part.isdigit() else int(part)
            if idx is None or not 0 <= idx <= 7:
                return None
            names.append(_DAYS[idx])
        return "on " + _join(names)
    if dow == "*" and dom.isdigit():
        where = f"on day {dom} of "
        if month == "*":
            return where + "every month"
        if month.isdigit() and 1 <= int(month) <= 12:
            return where + _MONTHS[int(month) - 1]
    return None


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _describe_cron(cron: str) -> str | None:
    minute, hour, dom, month, dow = cron.split()
    days = _describe_days(dom, month, dow)
    if days is None:
        return None
    daily = days == "every day"
    suffix = "" if daily else f" {days}"
    if hour == "*" and (minute == "*" or minute.startswith("*/")):
        step = 1 if minute == "*" else int(minute[2:])
        return _plural(step, "minute") + suffix
    if hour == "*" and minute.isdigit():
        return ("every hour" if minute == "0" else f"every hour at minute {int(minute)}") + suffix
    if hour.startswith("*/") and minute.isdigit():
        at = "" if minute == "0" else f" at minute {int(minute)}"
        return _plural(int(hour[2:]), "hour") + at + suffix
    if minute.isdigit() and all(h.isdigit() for h in hour.split(",")):
        times = [f"{int(h):02d}:{int(minute):02d}" for h in hour.split(",")]
        return f"at {_join(times)} {days}"
    if minute.isdigit() and re.fullmatch(r"\d+-\d+", hour):
        lo, hi = (int(x) for x in hour.split("-"))
        return f"every hour from {lo:02d}:{int(minute):02d} to {hi:02d}:{int(minute):02d} {days}"
    return None


class Scheduler:
    """Tracks, per service, when it last ran and whether it is due (single-threaded use)."""

    def __init__(self, schedules: Mapping[str, Schedule], started: datetime | None = None) -> None:
        self.schedules = dict(schedules)
        start = started or datetime.now().astimezone()
        # Crontab services wait for their next slot after start; interval services run at once.
        self._last: dict[str, datetime | None] = {
            name: (start if s.kind == "cron" else None) for name, s in self.schedules.items()
        }

    def due(self, now: datetime) -> list[str]:
        return [n for n, s in self.schedules.items() if s.due(now, self._last[n])]

    def done(self, service: str, at: datetime) -> None:
        """Record a run that ended at ``at`` (call it after failures too: no hot retry loop)."""
        self._last[service] = at

    def last_run(self, service: str) -> datetime | None:
        return self._last.get(service)

    def next_run(self, service: str) -> datetime | None:
        """When the service runs next (``None`` for continuous)."""
        s = self.schedules[service]
        last = self._last[service]
        if s.kind == "interval" and last is None:
            return datetime.now().astimezone()
        return s.next_after(last or datetime.now().astimezone())
