"""Replication lag history: the ``sync_lag_history`` table, samples of each source's lag.

``replication_status`` only holds the *current* lag per source; the Manage page's chart of the
last hours needs samples. The daemon records one sample per source about once a minute
(:meth:`replicator.staging.StagingStore.record_lag_sample`, which also drops samples past the
retention, in the same transaction); the page reads them with :func:`lag_history` and draws them
with :func:`replicator.web.lag.sparkline_svg`. The table is created on first use (idempotent).
Times are stored as UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.db import reading
from replicator.staging import schema
from replicator.staging.values import utc

log = structlog.get_logger(__name__)

__all__ = [
    "DEFAULT_RETENTION",
    "LagSample",
    "ensure_lag_history",
    "lag_history",
    "lag_history_t",
    "purge_lag_history",
    "record_lag_sample",
]


DEFAULT_RETENTION = timedelta(hours=48)

lag_history_t = schema.lag_history


@dataclass(frozen=True)
class LagSample:
    at: datetime
    lag_seconds: float | None
    lag_bytes: int | None


def ensure_lag_history(engine: sa.Engine) -> None:
    """Create ``sync_lag_history`` when missing (idempotent)."""
    schema.create_tables(engine, lag_history_t)


def _num(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def record_lag_sample(
    store_engine: sa.Engine,
    rows: Iterable[Mapping[str, Any]],
    *,
    at: datetime | None = None,
    retention: timedelta = DEFAULT_RETENTION,
) -> int:
    """Store one lag sample per row of ``StagingStore.replication_status()``; purge old samples.

    Each row needs ``source`` and may carry ``lag_seconds`` / ``lag_bytes`` (None is stored as
    "not measured"). Samples older than ``retention`` are deleted in the same transaction.
    Returns the number of samples written. Never raises for a database problem: the failure is
    logged and 0 returned (a missing chart point must not disturb the daemon loop).
    """
    when = utc(at) if at is not None else datetime.now(UTC)
    values = []
    for r in rows:
        source = r.get("source")
        if not source:
            continue
        seconds = _num(r.get("lag_seconds"))
        nbytes = _num(r.get("lag_bytes"))
        values.append(
            {
                "at": when,
                "source": str(source),
                "lag_seconds": seconds,
                "lag_bytes": None if nbytes is None else int(nbytes),
            }
        )
    try:
        ensure_lag_history(store_engine)
        with store_engine.begin() as conn:
            if values:
                conn.execute(lag_history_t.insert(), values)
            conn.execute(lag_history_t.delete().where(lag_history_t.c.at < when - retention))
    except sa.exc.SQLAlchemyError as exc:
        log.warning("lag_sample_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return 0
    return len(values)


def purge_lag_history(
    engine: sa.Engine, retention: timedelta = DEFAULT_RETENTION, now: datetime | None = None
) -> int:
    """Delete samples older than ``retention``; returns how many went."""
    cutoff = (utc(now) if now else datetime.now(UTC)) - retention
    ensure_lag_history(engine)
    with engine.begin() as conn:
        res = conn.execute(lag_history_t.delete().where(lag_history_t.c.at < cutoff))
    return int(res.rowcount or 0)


def lag_history(
    engine: sa.Engine, since: datetime, sources: Sequence[str] | None = None
) -> dict[str, list[LagSample]]:
    """Samples since ``since`` per source, oldest first (empty when the table does not exist)."""
    with reading(engine) as conn:
        exists = sa.inspect(conn).has_table(lag_history_t.name)
    if not exists:
        return {}
    t = lag_history_t
    stmt = (
        sa.select(t.c.source, t.c.at, t.c.lag_seconds, t.c.lag_bytes)
        .where(t.c.at >= utc(since))
        .order_by(t.c.source, t.c.at)
    )
    if sources is not None:
        stmt = stmt.where(t.c.source.in_(list(sources)))
    out: dict[str, list[LagSample]] = {}
    with reading(engine) as conn:
        for source, at, secs, nbytes in conn.execute(stmt):
            out.setdefault(str(source), []).append(
                LagSample(utc(at), _num(secs), None if nbytes is None else int(nbytes))
            )
    return out
