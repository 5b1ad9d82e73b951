"""Replication lag history for the Manage page's chart: the ``sync_lag_history`` table.

``replication_status`` only holds the *current* lag per source; the chart of the last hours needs
samples. The daemon loop records one sample per source about once a minute with
:func:`record_lag_sample` (which also drops samples past the retention, in the same transaction),
and the page reads them with :func:`lag_history` and draws them with :func:`sparkline_svg` — an
inline SVG rendered on the server, so the page needs no charting library.

The table has its own SQLAlchemy ``MetaData`` (like ``log_records``) and is created on first use
with ``create_all`` (idempotent) on the staging engine; it needs no migration with the staging
schema. Times are stored as UTC.

Wiring (for ``replicator/daemon.py``)::

    from replicator.web.lag import record_lag_sample

    # once a minute, in the main loop (cheap: one INSERT per source plus an indexed DELETE):
    if now - last_lag_sample >= 60:
        record_lag_sample(store.engine, store.replication_status())
        last_lag_sample = now
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from markupsafe import Markup, escape

from replicator.logstore import id_column, utc

log = structlog.get_logger(__name__)

__all__ = [
    "DEFAULT_RETENTION",
    "LagSample",
    "ensure_lag_history",
    "lag_history",
    "lag_history_t",
    "metadata",
    "purge_lag_history",
    "record_lag_sample",
    "sparkline_svg",
]

DEFAULT_RETENTION = timedelta(hours=48)
NO_VALUE = "\u2013"  # shown for "not measured"

metadata = sa.MetaData()

lag_history_t = sa.Table(
    "sync_lag_history",
    metadata,
    id_column(),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("lag_seconds", sa.Float(), nullable=True),
    sa.Column("lag_bytes", sa.BigInteger(), nullable=True),
    sa.Index("ix_sync_lag_history_source_at", "source", "at"),
    sa.Index("ix_sync_lag_history_at", "at"),
)


@dataclass(frozen=True)
class LagSample:
    at: datetime
    lag_seconds: float | None
    lag_bytes: int | None


def ensure_lag_history(engine: sa.Engine) -> None:
    """Create ``sync_lag_history`` when missing (idempotent)."""
    metadata.create_all(engine, checkfirst=True)


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
    if not sa.inspect(engine).has_table(lag_history_t.name):
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
    with engine.connect() as conn:
        for source, at, secs, nbytes in conn.execute(stmt):
            out.setdefault(str(source), []).append(
                LagSample(utc(at), _num(secs), None if nbytes is None else int(nbytes))
            )
    return out


def human_bytes(n: float | None) -> str:
    if n is None:
        return NO_VALUE
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - loop always returns


def human_seconds(s: float | None) -> str:
    if s is None:
        return NO_VALUE
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def sparkline_svg(
    samples: Sequence[LagSample],
    *,
    field: str,
    start: datetime,
    end: datetime,
    title: str,
    width: int = 320,
    height: int = 64,
) -> Markup:
    """A small line chart of ``field`` ("lag_seconds" or "lag_bytes") over ``[start, end]``.

    Gaps (no sample for more than five minutes — or three usual sample intervals —, or an
    unmeasured value) break the line, so an
    outage of the daemon is visible as a hole rather than a straight line across it. Colours come
    from SVG attributes (the page's Content-Security-Policy forbids inline styles).
    """
    fmt = human_bytes if field == "lag_bytes" else human_seconds
    pad_top, pad_bottom = 6, 14
    plot_h = height - pad_top - pad_bottom
    span = max((end - start).total_seconds(), 1.0)
    pts = [(s.at, getattr(s, field)) for s in samples if start <= s.at <= end]
    values = [float(v) for _, v in pts if v is not None]
    peak = max(values) if values else 0.0
    top = peak if peak > 0 else 1.0

    def xy(at: datetime, v: float) -> str:
        x = (at - start).total_seconds() / span * width
        y = pad_top + plot_h - (v / top) * plot_h
        return f"{x:.1f},{y:.1f}"

    steps = sorted((b[0] - a[0]).total_seconds() for a, b in itertools.pairwise(pts))
    gap = max(300.0, 3 * steps[len(steps) // 2]) if steps else 300.0
    segments: list[list[str]] = []
    current: list[str] = []
    prev: datetime | None = None
    for at, v in pts:
        if v is None or (prev is not None and (at - prev).total_seconds() > gap):
            if current:
                segments.append(current)
            current = []
        if v is not None:
            current.append(xy(at, float(v)))
        prev = at
    if current:
        segments.append(current)

    parts = [
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="100%" height="{height}" '
        f'role="img" preserveAspectRatio="none" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="0" y1="{pad_top + plot_h}" x2="{width}" y2="{pad_top + plot_h}" '
        'stroke="#c8ced6" stroke-width="1"/>',
    ]
    for seg in segments:
        if len(seg) == 1:
            x, y = seg[0].split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="#2563eb"/>')
        else:
            parts.append(
                f'<polyline points="{" ".join(seg)}" fill="none" stroke="#2563eb" '
                'stroke-width="1.5" stroke-linejoin="round" vector-effect="non-scaling-stroke"/>'
            )
    if not values:
        parts.append(
            f'<text x="{width / 2:.0f}" y="{pad_top + plot_h / 2 + 4:.0f}" text-anchor="middle" '
            'font-size="11" fill="#6b7280">no samples yet</text>'
        )
    hours = span / 3600
    parts.append(
        f'<text x="2" y="{height - 2}" font-size="10" fill="#6b7280">'
        f"{escape(f'-{hours:g} h')}</text>"
    )
    parts.append(
        f'<text x="{width - 2}" y="{height - 2}" font-size="10" fill="#6b7280" '
        'text-anchor="end">now</text>'
    )
    parts.append(
        f'<text x="{width - 2}" y="{pad_top + 4}" font-size="10" fill="#6b7280" '
        f'text-anchor="end">peak {escape(fmt(peak if values else None))}</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))
