"""Recent log records kept in the staging store, for ``sync-daemon logs`` and the Manage page.

journald stays the primary log (see :mod:`replicator.log`); this module keeps a searchable copy
of the last ``logging.retention_days`` in a ``log_records`` table of the staging store, so an
operator can ask "what failed for shop X since yesterday" without journal access.

Logging must never block or fail the daemon, so :meth:`LogStore.sink` only puts a small tuple on
a bounded queue (a full queue drops the record and counts it) and a background thread inserts in
batches. A failing insert is logged (rate-limited) and the batch dropped; journald still has it.
Records logged by this module itself are not stored, so a broken staging store cannot feed a loop
of "insert failed" records.

The table is defined with the other staging tables (:mod:`replicator.staging.schema`) and created
on first use (idempotent) on the staging engine; this module is the only code that reads or
writes it.

Wiring (for ``replicator/daemon.py``)::

    from replicator.log import add_sink, remove_sink
    from replicator.logstore import LogStore

    logstore = LogStore(staging_engine, cfg.logging.retention_days)   # creates the table
    logstore.start()                  # writer thread
    add_sink(logstore.sink)
    ...
    logstore.purge()                  # from the daily sweep: deletes records past retention
    ...
    remove_sink(logstore.sink)        # in the daemon's ``finally``
    logstore.stop()                   # flushes what is queued (bounded by a timeout)

``logstore.dropped`` counts records lost to a full queue or a failed insert.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.db import reading
from replicator.staging.schema import create_tables, log_records
from replicator.staging.values import utc

log = structlog.get_logger(__name__)

__all__ = ["LEVELS", "LogRecord", "LogStore", "log_records", "utc"]

# Lowest first; "this level and above" filters on the suffix of this list.
LEVELS = ("debug", "info", "warning", "error", "critical")
_LEVEL_ALIASES = {"warn": "warning", "exception": "error", "fatal": "critical"}

# Keys the sink lifts into columns, or that the renderer adds and the table does not need.
_COLUMN_KEYS = {"event", "level", "logger", "service", "timestamp"}
_SKIP_KEYS = {"_record", "_from_structlog"}


def normalize_level(level: str) -> str:
    """``"WARN"`` → ``"warning"``; ValueError for an unknown level."""
    name = level.strip().lower()
    name = _LEVEL_ALIASES.get(name, name)
    if name not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    return name


def levels_at_or_above(level: str) -> tuple[str, ...]:
    return LEVELS[LEVELS.index(normalize_level(level)) :]


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


@dataclass(frozen=True)
class LogRecord:
    """One stored log record."""

    id: int
    at: datetime
    level: str
    service: str | None
    logger: str | None
    event: str
    fields: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["at"] = self.at.isoformat().replace("+00:00", "Z")
        return d


_Row = tuple[datetime, str, str | None, str | None, str, dict[str, Any]]


class LogStore:
    """The ``log_records`` table: a non-blocking sink, a batch writer thread, purge and query."""

    def __init__(
        self,
        engine: sa.Engine,
        retention_days: float = 14.0,
        *,
        min_level: str = "info",
        queue_size: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        create: bool = True,
    ) -> None:
        self.engine = engine
        self.retention = timedelta(days=retention_days)
        self.min_levels = frozenset(levels_at_or_above(min_level))
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._queue: queue.Queue[_Row] = queue.Queue(maxsize=queue_size)
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = 0.0
        if create:
            create_tables(engine, log_records)

    # -- the sink (called on the logging path: must be cheap and never raise) -----------------

    def sink(self, event_dict: MutableMapping[str, Any]) -> None:
        """Hand a (redacted) structlog event dict to the writer; drop and count when full."""
        try:
            logger = event_dict.get("logger")
            if logger == __name__:
                return
            level = str(event_dict.get("level", "info")).lower()
            level = _LEVEL_ALIASES.get(level, level)
            if level not in self.min_levels:
                return
            at = datetime.now(UTC)
            ts = event_dict.get("timestamp")
            if isinstance(ts, str):
                with contextlib.suppress(ValueError):
                    at = utc(datetime.fromisoformat(ts))
            fields = {
                k: v for k, v in event_dict.items() if k not in _COLUMN_KEYS and k not in _SKIP_KEYS
            }
            service = event_dict.get("service")
            row: _Row = (
                at,
                level,
                None if service is None else str(service),
                None if logger is None else str(logger),
                str(event_dict.get("event", "")),
                fields,
            )
            self._queue.put_nowait(row)
        except queue.Full:
            self._count_dropped(1)
        except Exception:  # never let a malformed record reach the daemon
            self._count_dropped(1)

    @property
    def dropped(self) -> int:
        """Records lost to a full queue or a failed insert since start."""
        return self._dropped

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def _count_dropped(self, n: int) -> None:
        with self._dropped_lock:
            self._dropped += n

    # -- the writer -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="logstore-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (within ``timeout``) and stop the writer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued record was written (or dropped). True when drained."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch:
                self._write(batch)
                for _ in batch:
                    self._queue.task_done()
            elif self._stop.is_set():
                return

    def _take_batch(self) -> list[_Row]:
        batch: list[_Row] = []
        try:
            batch.append(self._queue.get(timeout=0.05 if self._stop.is_set() else 0.2))
        except queue.Empty:
            return batch
        # Collect more for a short while: one INSERT per batch, not per record.
        deadline = time.monotonic() + (0 if self._stop.is_set() else self.flush_interval / 10)
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[_Row]) -> None:
        rows = [
            {
                "at": at,
                "level": level,
                "service": service,
                "logger": logger,
                "event": event,
                "fields": {k: _jsonable(v) for k, v in fields.items()},
            }
            for at, level, service, logger, event, fields in batch
        ]
        try:
            with self.engine.begin() as conn:
                conn.execute(log_records.insert(), rows)
        except Exception as exc:
            self._count_dropped(len(batch))
            now = time.monotonic()
            if now - self._last_error_log > 60:  # one warning a minute, not one per batch
                self._last_error_log = now
                log.warning(
                    "log_records_insert_failed",
                    error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                    dropped_total=self._dropped,
                )

    # -- maintenance and reading ---------------------------------------------------------------

    def purge(self, now: datetime | None = None) -> int:
        """Delete records older than the retention; returns how many went."""
        cutoff = (now or datetime.now(UTC)) - self.retention
        with self.engine.begin() as conn:
            result = conn.execute(log_records.delete().where(log_records.c.at < cutoff))
        return int(result.rowcount or 0)

    def query(
        self,
        service: str | None = None,
        level: str | None = None,
        since: datetime | None = None,
        limit: int = 200,
    ) -> list[LogRecord]:
        """The newest ``limit`` matching records, oldest first (like ``tail``).

        ``level`` means "this level and above"; ``since`` is inclusive.
        """
        return query_records(self.engine, service=service, level=level, since=since, limit=limit)


def query_records(
    engine: sa.Engine,
    service: str | None = None,
    level: str | None = None,
    since: datetime | None = None,
    limit: int = 200,
) -> list[LogRecord]:
    """:meth:`LogStore.query` without a store (the CLI reads; it never creates the table)."""
    t = log_records
    stmt = sa.select(t).order_by(t.c.at.desc(), t.c.id.desc()).limit(max(1, limit))
    if service is not None:
        stmt = stmt.where(t.c.service == service)
    if level is not None:
        stmt = stmt.where(t.c.level.in_(levels_at_or_above(level)))
    if since is not None:
        stmt = stmt.where(t.c.at >= utc(since))
    with reading(engine) as conn:
        rows = conn.execute(stmt).mappings().all()
    records = [
        LogRecord(
            id=int(r["id"]),
            at=utc(r["at"]),
            level=r["level"],
            service=r["service"],
            logger=r["logger"],
            event=r["event"],
            fields=r["fields"] or {},
        )
        for r in rows
    ]
    records.reverse()
    return records


def services(engine: sa.Engine) -> list[str]:
    """The services that have records, sorted (the Manage page's filter choices)."""
    stmt = sa.select(log_records.c.service).where(log_records.c.service.is_not(None)).distinct()
    with reading(engine) as conn:
        return sorted(str(s) for (s,) in conn.execute(stmt))


def has_table(engine: sa.Engine) -> bool:
    with reading(engine) as conn:
        return sa.inspect(conn).has_table(log_records.name)
