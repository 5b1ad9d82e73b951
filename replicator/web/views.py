"""What the Manage page shows, read from the staging store and the daemon state.

The order columns and the service rows ``status`` prints too come from the read model
(:mod:`replicator.ops.readmodel`); this module adds what only the page shows (the updates queue,
one order's detail, logs, the replication charts) and the formatting helpers of its templates.

This module runs no query of its own: every read (orders, updates, one order and its timeline,
log records, lag history) is a function of the read model or of the table's owner, and this
module shapes the result for the templates. Nothing creates the ledger tables: a daemon whose
order import never ran shows "no orders yet".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from markupsafe import Markup

from replicator.log import redact
from replicator.logstore import LEVELS, LogRecord, utc
from replicator.ops.format import NO_VALUE, human_bytes, human_seconds
from replicator.ops.readmodel import (
    ORDER_STATES,
    OrderColumn,
    OrdersView,
    ServiceRow,
    has_log_records,
    log_services,
    order_counts,
    order_with_events,
    orders_view,
    pending_updates,
    progress_pct,
    recent_logs,
    services_view,
    unconfigured_services,
    utcnow,
)
from replicator.orders.ledger import Entry, Event
from replicator.staging.lag import LagSample, lag_history
from replicator.web.lag import sparkline_svg

log = structlog.get_logger(__name__)

ORDER_COLUMNS = ORDER_STATES
OTHER_STATES = ("skipped", "update-pending")


def as_utc(t: datetime | None) -> datetime | None:
    """:func:`replicator.logstore.utc`, passing None through."""
    return None if t is None else utc(t)


def fmt_time(t: Any) -> str:
    """``2026-11-22 06:41:01 UTC``; NO_VALUE (an en dash) for None; text as it is."""
    if t is None:
        return NO_VALUE
    if isinstance(t, str):
        try:
            t = datetime.fromisoformat(t)
        except ValueError:
            return t
    if isinstance(t, datetime):
        u = as_utc(t)
        assert u is not None
        return u.strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(t)


def age(t: Any, now: datetime | None = None) -> float | None:
    """Seconds since ``t`` (None when unknown)."""
    if t is None:
        return None
    if isinstance(t, str):
        try:
            t = datetime.fromisoformat(t)
        except ValueError:
            return None
    if not isinstance(t, datetime):
        return None
    u = as_utc(t)
    assert u is not None
    return max(0.0, ((now or utcnow()) - u).total_seconds())


def ago(t: Any, now: datetime | None = None) -> str:
    a = age(t, now)
    if a is None:
        return ""
    if a < 60:
        return "just now" if a < 5 else f"{a:.0f} s ago"
    if a < 3600:
        return f"{a / 60:.0f} min ago"
    if a < 172800:
        return f"{a / 3600:.1f} h ago"
    return f"{a / 86400:.0f} days ago"


# -------------------------------------------------------------------------------------- orders


def updates_view(engine: sa.Engine, limit: int = 100) -> tuple[bool, list[dict[str, Any]]]:
    """Orders changed in the shop after import (``update-pending``), newest first, with diffs."""
    rows = pending_updates(engine, limit)
    if rows is None:
        return False, []
    for r in rows:
        r["changes"] = parse_diff(r.get("diff"))
    return True, rows


def parse_diff(diff: str | None) -> list[dict[str, Any]]:
    if not diff:
        return []
    try:
        data = json.loads(diff)
    except ValueError:
        return [{"field": "(unreadable diff)", "old": "", "new": diff[:500]}]
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


@dataclass
class OrderDetail:
    entry: Entry
    events: list[Event]
    payload_text: str
    pending_text: str | None
    changes: list[dict[str, Any]]
    mapped: dict[str, Any] | None = None
    mapped_error: str | None = None


def _pretty(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


MAX_PAYLOAD_SHOWN = 512 * 1024


def order_detail(engine: sa.Engine, shop: str, e_number: str) -> OrderDetail | None:
    found = order_with_events(engine, shop, e_number)
    if found is None:
        return None
    entry, events = found
    payload = _pretty(entry.payload[:MAX_PAYLOAD_SHOWN])
    if len(entry.payload) > MAX_PAYLOAD_SHOWN:
        payload += f"\n… ({len(entry.payload)} bytes in all; first {MAX_PAYLOAD_SHOWN} shown)"
    pending = _pretty(entry.pending_payload) if entry.pending_payload is not None else None
    return OrderDetail(
        entry=entry,
        events=events,
        payload_text=payload,
        pending_text=pending,
        changes=parse_diff(entry.diff),
    )


def map_order_rows(importer: Any, entry: Entry) -> tuple[dict[str, Any] | None, str | None]:
    """What the shop's current mapping makes of the stored payload (``sync-daemon map
    --dry-run``): ({table: rows}, None), or (None, why not). Nothing is written."""
    # Only with an order import (``importer``): a daemon without one, and the Manage page it
    # serves, do not load the mappers and the shop connectors (~0.1 s of its start).
    from replicator.mappers.orders import OrderRejected  # noqa: PLC0415 - order import only
    from replicator.orders.inbox import PayloadError, parse_payload  # noqa: PLC0415 - order import only
    from replicator.orders.plan_writer import PlanWriter  # noqa: PLC0415 - order import only

    try:
        writer = importer.writer_for(entry.shop)
        m = writer.m
        payload = parse_payload(entry.payload)
        crit = importer.ocfg.criteria_for(entry.shop)
        if isinstance(writer, PlanWriter):
            # Written in a transaction that is rolled back (real keys, lookups and numbering).
            with importer.engine.connect() as conn:
                rows = writer.dry_run(
                    conn, entry.shop, entry.e_number, payload, crit.mode == "auto_invoice"
                )
            return dict(rows), None
        with importer.engine.connect() as conn:
            try:
                mapped = writer.map(
                    conn, entry.shop, entry.e_number, payload, crit.mode == "auto_invoice"
                )
            finally:
                conn.rollback()
    except (OrderRejected, PayloadError) as exc:
        return None, str(getattr(exc, "reason", None) or exc)
    except Exception as exc:  # ERP unreachable, mapping missing: say so, keep the page up
        return None, redact(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    header = dict(mapped.header)
    header[m.order_number_column] = entry.erp_order_no or "<assigned at import>"
    lines = [
        {**ln, m.lines_order_column: entry.erp_order_no or "<order number>"} for ln in mapped.lines
    ]
    tables: dict[str, Any] = {m.header_table: [header], m.lines_table: lines}
    return tables, None


# ---------------------------------------------------------------------------------------- logs

SINCE_CHOICES = {
    "15m": ("last 15 minutes", timedelta(minutes=15)),
    "1h": ("last hour", timedelta(hours=1)),
    "6h": ("last 6 hours", timedelta(hours=6)),
    "24h": ("last 24 hours", timedelta(hours=24)),
    "7d": ("last 7 days", timedelta(days=7)),
    "all": ("any time", None),
}


@dataclass
class LogsView:
    available: bool
    records: list[LogRecord]
    services: list[str]
    service: str
    level: str
    since: str
    limit: int


def logs_view(
    engine: sa.Engine,
    query: Callable[..., list[LogRecord]] | None,
    service: str = "",
    level: str = "",
    since: str = "24h",
    limit: int = 200,
) -> LogsView:
    """Newest first; ``level`` means "this level and above"."""
    if level not in LEVELS:
        level = ""
    if since not in SINCE_CHOICES:
        since = "24h"
    if not has_log_records(engine):
        return LogsView(False, [], [], service, level, since, limit)
    delta = SINCE_CHOICES[since][1]
    start = utcnow() - delta if delta is not None else None
    run = query or (lambda **kw: recent_logs(engine, **kw))
    records = run(service=service or None, level=level or None, since=start, limit=limit)
    records = list(reversed(records))
    services = log_services(engine)
    return LogsView(True, records, services, service, level, since, limit)


def log_fields(rec: LogRecord) -> str:
    """The record's extra fields as ``key=value`` text, redacted."""
    parts = []
    for k, v in rec.fields.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)
        parts.append(f"{k}={text}")
    return redact(" ".join(parts))


# ------------------------------------------------------------------------------------ services


def fmt_local(t: datetime | None) -> str:
    """Schedule times are local (what an operator means by "at 02:30")."""
    if t is None:
        return NO_VALUE
    return t.astimezone().strftime("%a %Y-%m-%d %H:%M %Z")


# --------------------------------------------------------------------------------- replication


@dataclass
class SourceRow:
    source: str
    slot: str | None
    state: str | None
    confirmed_position: str | None
    last_replication_at: Any
    last_replication_age: float | None
    heartbeat_at: Any
    heartbeat_age: float | None
    lag_seconds: float | None
    lag_bytes: int | None
    changes_applied: int | None
    chart_seconds: Markup
    chart_bytes: Markup
    samples: int
    chart_span: str = ""


def replication_view(
    engine: sa.Engine,
    status_rows: Sequence[dict[str, Any]],
    hours: float = 6.0,
    now: datetime | None = None,
) -> list[SourceRow]:
    end = now or utcnow()
    start = end - timedelta(hours=hours)
    history = lag_history(engine, start)
    out = []
    for r in status_rows:
        source = str(r.get("source"))
        samples: list[LagSample] = history.get(source, [])
        # Fit the window to the data: a daemon that started 20 minutes ago gets a 20-minute
        # chart, not a 6-hour box with a sliver at the right (at least 10 minutes wide).
        first = min((x.at for x in samples), default=start)
        chart_start = min(end - timedelta(minutes=10), max(start, first))
        span = human_seconds((end - chart_start).total_seconds())
        ls = r.get("lag_seconds")
        lb = r.get("lag_bytes")
        out.append(
            SourceRow(
                source=source,
                slot=r.get("slot"),
                state=r.get("state"),
                confirmed_position=r.get("confirmed_position"),
                last_replication_at=r.get("last_replication_at"),
                last_replication_age=age(r.get("last_replication_at"), end),
                heartbeat_at=r.get("heartbeat_at"),
                heartbeat_age=age(r.get("heartbeat_at"), end),
                lag_seconds=None if ls is None else float(ls),
                lag_bytes=None if lb is None else int(lb),
                changes_applied=r.get("changes_applied"),
                chart_seconds=sparkline_svg(
                    samples,
                    field="lag_seconds",
                    start=chart_start,
                    end=end,
                    title=f"lag in seconds of {source}, last {span}",
                ),
                chart_bytes=sparkline_svg(
                    samples,
                    field="lag_bytes",
                    start=chart_start,
                    end=end,
                    title=f"lag in bytes of {source}, last {span}",
                ),
                samples=len(samples),
                chart_span=span,
            )
        )
    return out


__all__ = [
    "ORDER_COLUMNS",
    "SINCE_CHOICES",
    "LogsView",
    "OrderColumn",
    "OrderDetail",
    "OrdersView",
    "ServiceRow",
    "SourceRow",
    "age",
    "ago",
    "fmt_local",
    "fmt_time",
    "human_bytes",
    "human_seconds",
    "log_fields",
    "logs_view",
    "map_order_rows",
    "order_counts",
    "order_detail",
    "orders_view",
    "progress_pct",
    "replication_view",
    "services_view",
    "unconfigured_services",
    "updates_view",
]
