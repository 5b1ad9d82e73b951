"""The read model: the queries behind ``sync-daemon status``, ``lag`` and ``logs``, the Manage
page and ``/metrics``.

Every function here only reads (the staging store, the order ledger, the log records, the ERP's
``pg_replication_slots``); none creates a table. ``status`` prints what :func:`collect_status`
returns, the Manage page (:mod:`replicator.web.views`) renders the same order columns and
service rows, and the metrics collector (:mod:`replicator.ops.gauges`) asks the same ledger and
slot queries. One query, one place: the terminal, the page and the scrape cannot disagree, and
the modules that show the figures (``status``, ``web/views``, ``commands/logs``) only format.
Tables that have an owning API are read through it (the log records through
:mod:`replicator.logstore`, the checkpoints' view and lag history through
:mod:`replicator.staging`); the order ledger is read here with SQLAlchemy Core on its tables,
because paging, counts per state and a search are not what :class:`~replicator.orders.ledger.
Ledger` offers, and constructing a ``Ledger`` would create its tables.
``tests/test_ops_readonly.py`` proves that none of this writes.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import psycopg
import sqlalchemy as sa
import structlog

from replicator import logstore
from replicator.config import Config
from replicator.db import connect_error, null_pool_engine, pg_connect, reading
from replicator.ha import describe
from replicator.log import redact
from replicator.logstore import LogRecord
from replicator.ops.format import human_bytes
from replicator.orders.ledger import Entry, Event, entry_from_row, events_t, ledger_t
from replicator.staging import StagingStore
from replicator.staging.state import has_replication_status, replication_status

log = structlog.get_logger(__name__)

# The order states ``status`` lists, in this order (the Manage page's three columns).
ORDER_STATES = ("delivered", "awaiting", "failed")


def utcnow() -> datetime:
    return datetime.now(dt.UTC)


ORDER_LIST_COLUMNS = (
    ledger_t.c.id,
    ledger_t.c.shop,
    ledger_t.c.e_number,
    ledger_t.c.erp_order_no,
    ledger_t.c.state,
    ledger_t.c.attempts,
    ledger_t.c.last_error,
    ledger_t.c.shop_status,
    ledger_t.c.first_seen,
    ledger_t.c.last_seen,
    ledger_t.c.delivered_at,
    ledger_t.c.next_attempt_at,
    ledger_t.c.update_queued,
    ledger_t.c.diff,
)


def has_table(engine: sa.Engine, name: str) -> bool:
    """Whether the staging store has table ``name`` yet (nothing here creates one)."""
    with reading(engine) as conn:
        return sa.inspect(conn).has_table(name)


@dataclass
class OrderColumn:
    """One state's column: a page of orders, newest first."""

    state: str
    rows: list[dict[str, Any]]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass
class OrdersView:
    available: bool
    columns: list[OrderColumn] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    query: str = ""


def _search(q: str) -> Any:
    return sa.or_(
        ledger_t.c.e_number.icontains(q, autoescape=True),
        ledger_t.c.erp_order_no.icontains(q, autoescape=True),
    )


def orders_view(
    engine: sa.Engine, pages: dict[str, int], per_page: int = 20, query: str = ""
) -> OrdersView:
    """The three order columns (delivered, awaiting, failed) and the count of every state."""
    if not has_table(engine, ledger_t.name):
        return OrdersView(available=False, query=query)
    q = query.strip()
    view = OrdersView(available=True, query=q)
    with reading(engine) as conn:
        counts = sa.select(ledger_t.c.state, sa.func.count()).group_by(ledger_t.c.state)
        if q:
            counts = counts.where(_search(q))
        view.counts = {str(s): int(n) for s, n in conn.execute(counts)}
        for state in ORDER_STATES:
            total = view.counts.get(state, 0)
            per = max(1, per_page)
            page = min(max(1, pages.get(state, 1)), max(1, -(-total // per)))
            # Newest fate first: imported most recently, or arrived most recently. Not by
            # last seen: every cycle touches it and the column would reshuffle for nothing.
            newest = (
                [ledger_t.c.delivered_at.desc().nulls_last(), ledger_t.c.id.desc()]
                if state == "delivered"
                else [ledger_t.c.id.desc()]
            )
            stmt = (
                sa.select(*ORDER_LIST_COLUMNS)
                .where(ledger_t.c.state == state)
                .order_by(*newest)
                .limit(per)
                .offset((page - 1) * per)
            )
            if q:
                stmt = stmt.where(_search(q))
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
            _fate_times(conn, rows)
            for r in rows:
                if r["last_error"]:
                    r["last_error"] = redact(r["last_error"])
            view.columns.append(OrderColumn(state, rows, total, page, per))
    return view


def unconfigured_services(cfg: Any) -> list[str]:
    """Scheduled services this config does not run (their schedule has a default anyway)."""
    out = []
    if not (getattr(cfg.orders, "enabled", False) and getattr(cfg, "shops", ())):
        out.append("orders")
    if getattr(cfg, "stock_push", None) is None:
        out.append("reconcile")
    if getattr(cfg, "invoice_push", None) is None:
        out.append("invoices")
    return out


def _fate_times(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """``fate_at`` of each row: when it was imported (delivered), parked (failed: the last
    "failed" event) or first seen — never last seen, which every cycle moves to "just now"."""
    failed = [r["e_number"] for r in rows if r["state"] == "failed"]
    parked: dict[tuple[str, str], Any] = {}
    if failed:
        q = (
            sa.select(events_t.c.shop, events_t.c.e_number, sa.func.max(events_t.c.at))
            .where(events_t.c.e_number.in_(failed), events_t.c.event == "failed")
            .group_by(events_t.c.shop, events_t.c.e_number)
        )
        parked = {(str(sh), str(e)): at for sh, e, at in conn.execute(q)}
    for r in rows:
        if r["state"] == "delivered" and r.get("delivered_at"):
            r["fate_at"] = r["delivered_at"]
        else:
            r["fate_at"] = parked.get((r["shop"], r["e_number"])) or r["first_seen"]


def order_counts(engine: sa.Engine) -> dict[str, int]:
    """Orders per state (empty when the ledger does not exist yet)."""
    if not has_table(engine, ledger_t.name):
        return {}
    stmt = sa.select(ledger_t.c.state, sa.func.count()).group_by(ledger_t.c.state)
    with reading(engine) as conn:
        return {str(s): int(n) for s, n in conn.execute(stmt)}


def pending_updates(engine: sa.Engine, limit: int = 100) -> list[dict[str, Any]] | None:
    """Orders changed in the shop after import (``update-pending``), newest first; None when
    the ledger does not exist yet. ``last_error`` is redacted."""
    if not has_table(engine, ledger_t.name):
        return None
    stmt = (
        sa.select(*ORDER_LIST_COLUMNS)
        .where(ledger_t.c.state == "update-pending")
        .order_by(ledger_t.c.last_seen.desc(), ledger_t.c.id.desc())
        .limit(limit)
    )
    with reading(engine) as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    for r in rows:
        if r["last_error"]:
            r["last_error"] = redact(r["last_error"])
    return rows


def order_with_events(
    engine: sa.Engine, shop: str, e_number: str
) -> tuple[Entry, list[Event]] | None:
    """One order's ledger entry and its timeline, oldest event first (the rows
    :meth:`Ledger.get` and :meth:`Ledger.events` read); errors and details redacted."""
    if not has_table(engine, ledger_t.name):
        return None
    with reading(engine) as conn:
        row = conn.execute(
            sa.select(ledger_t).where(ledger_t.c.shop == shop, ledger_t.c.e_number == e_number)
        ).first()
        if row is None:
            return None
        entry = entry_from_row(row)
        if entry.last_error:
            entry = replace(entry, last_error=redact(entry.last_error))
        events = [
            Event(r.at, r.event, redact(r.detail) if r.detail else r.detail)
            for r in conn.execute(
                sa.select(events_t.c.at, events_t.c.event, events_t.c.detail)
                .where(events_t.c.shop == shop, events_t.c.e_number == e_number)
                .order_by(events_t.c.id)
            )
        ]
    return entry, events


def replication_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    """The ``replication_status`` view (empty before the first checkpoint created it)."""
    if not has_replication_status(engine):
        return []
    return replication_status(engine)


# -------------------------------------------------------------------------------- log records


def has_log_records(engine: sa.Engine) -> bool:
    """Whether the daemon created ``log_records`` here (nothing that only reads creates it)."""
    return logstore.has_table(engine)


def recent_logs(
    engine: sa.Engine,
    service: str | None = None,
    level: str | None = None,
    since: datetime | None = None,
    limit: int = 200,
) -> list[LogRecord]:
    """The newest ``limit`` matching log records, oldest first (the table must exist: see
    :func:`has_log_records`). ``level`` means that level and above."""
    return logstore.query_records(engine, service=service, level=level, since=since, limit=limit)


def log_services(engine: sa.Engine) -> list[str]:
    """The services that have log records, sorted (the table must exist)."""
    return logstore.services(engine)


def read_logs(
    staging_url: str,
    service: str | None = None,
    level: str | None = None,
    since: datetime | None = None,
    limit: int = 200,
) -> list[LogRecord] | None:
    """:func:`recent_logs` of the store at ``staging_url`` (``sync-daemon logs``), on an
    engine of its own that is closed before returning; None when there is no ``log_records``."""
    engine = null_pool_engine(staging_url, "logs")
    try:
        if not has_log_records(engine):
            return None
        return recent_logs(engine, service=service, level=level, since=since, limit=limit)
    finally:
        engine.dispose()


_PROGRESS = re.compile(r"(\d[\d,]*)\s*(?:/|of)\s*(\d[\d,]*)")


@dataclass
class ServiceRow:
    name: str
    schedule: str
    schedule_expr: str
    next_runs: list[datetime]
    last_run_at: datetime | None
    last_result: str
    last_ok: bool | None
    breaker_open: bool
    progress: str
    progress_pct: float | None
    failures: int


def progress_pct(text: str) -> float | None:
    m = _PROGRESS.search(text or "")
    if not m:
        return None
    done, total = (int(x.replace(",", "")) for x in m.groups())
    return None if total <= 0 else max(0.0, min(100.0, 100.0 * done / total))


def services_view(
    schedules: dict[str, Any], state: Any, now: datetime | None = None
) -> list[ServiceRow]:
    """Every scheduled service and every service the daemon reports, schedules first."""
    now_local = (now or utcnow()).astimezone()
    services = dict(getattr(state, "services", {}) or {})
    names = list(schedules) + [n for n in services if n not in schedules]
    rows = []
    for name in names:
        sched = schedules.get(name)
        st = services.get(name)
        nxt: list[datetime] = []
        next_at = getattr(st, "next_run_at", None)
        if next_at is not None:
            nxt.append(next_at)
        if sched is not None and sched.kind != "continuous":
            after = next_at or now_local
            if sched.kind == "interval" and next_at is None:
                last = getattr(st, "last_run_at", None)
                after = last.astimezone() if last is not None else now_local
            try:
                nxt += sched.next_runs(3 - len(nxt), after)
            except Exception as exc:  # a schedule we cannot evaluate must not break the page
                log.warning("schedule_next_runs_failed", service=name, error=str(exc))
        text = getattr(st, "progress", "") or ""
        rows.append(
            ServiceRow(
                name=name,
                schedule=sched.describe() if sched is not None else "run by the daemon",
                schedule_expr=sched.expr if sched is not None else "",
                next_runs=nxt[:3],
                last_run_at=getattr(st, "last_run_at", None),
                last_result=redact(getattr(st, "last_result", "not run yet") or ""),
                last_ok=getattr(st, "last_ok", None),
                breaker_open=bool(getattr(st, "breaker_open", False)),
                progress=redact(text),
                progress_pct=progress_pct(text),
                failures=int(getattr(st, "failures", 0) or 0),
            )
        )
    return rows


# ------------------------------------------------------------------------------ status


def _age(v: Any, now: dt.datetime) -> float | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = dt.datetime.fromisoformat(v)
    if v.tzinfo is None:
        v = v.replace(tzinfo=dt.UTC)
    return max(0.0, round((now - v).total_seconds(), 1))


def _iso(v: Any) -> str | None:
    """One timestamp format everywhere: ISO 8601 in UTC, ``T`` separated (SQLite stores text
    with a space, PostgreSQL hands back datetimes; ``status --json`` mixed both)."""
    if v is None:
        return None
    if isinstance(v, str):
        v = dt.datetime.fromisoformat(v)
    if v.tzinfo is None:
        v = v.replace(tzinfo=dt.UTC)
    return str(v.astimezone(dt.UTC).isoformat())


def daemon_liveness(row: dict[str, Any] | None, now: dt.datetime) -> dict[str, Any]:
    """Whether the daemon runs, from the mark its main loop refreshes every few seconds.

    Not running: it never ran here, it stopped (clean or fatal: ``stopped_at``), its process is
    gone (same host, pid not alive: kill -9, OOM), or its mark is older than three refresh
    intervals plus a margin (hung, or on another host and gone).
    """
    if row is None:
        return {"running": False, "since": None, "pid": None, "reason": "never started"}
    base = {"pid": row["pid"], "host": row["host"], "started_at": _iso(row["started_at"])}
    if row["stopped_at"] is not None:
        how = "stopped" if row["exit_code"] == 0 else f"exited with code {row['exit_code']}"
        return {**base, "running": False, "since": _iso(row["stopped_at"]), "reason": how}
    if row["host"] == socket.gethostname() and not _pid_alive(int(row["pid"])):
        return {**base, "running": False, "since": _iso(row["alive_at"]), "reason": "killed"}
    age = (now - row["alive_at"]).total_seconds()
    if age > 3 * float(row["alive_interval"]) + 10:
        return {
            **base,
            "running": False,
            "since": _iso(row["alive_at"]),
            "reason": "not responding",
        }
    return {**base, "running": True, "since": _iso(row["started_at"]), "reason": ""}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (status run as another account)
        return True
    return True


def collect_status(cfg: Config, *, per_state: int | None = 20) -> dict[str, Any]:
    """The facts ``status`` prints, as a JSON-able dict (no secrets)."""
    store = StagingStore(cfg.staging_url, role="status")
    now = dt.datetime.now(dt.UTC)
    try:
        # Opened, never set up: a store the daemon has not made yet shows "never started"
        # and stays empty (``status`` pointed at the wrong store creates nothing there).
        store.check_open()
        with reading(store.engine) as conn:
            tables = set(sa.inspect(conn).get_table_names())
        rows = replication_rows(store.engine)
        copying = {}
        for r in rows:
            cp = store.state.load_checkpoint(r["source"])
            copying[r["source"]] = (cp.extra if cp else {}).get("copying", [])
        liveness = store.state.load_liveness() if "sync_daemon" in tables else None
        daemon = daemon_liveness(liveness, now)
        saved = store.state.load_services() if "sync_services" in tables else []
        services = _services(cfg, saved, running=daemon["running"])
        orders = _orders(store, per_state)
    finally:
        store.dispose()
    sources = []
    for r in rows:
        sources.append(
            {
                "source": r["source"],
                "slot": r["slot"],
                # A stopped daemon streams nothing: the stored state is only what it last was.
                "state": r["state"] if daemon["running"] else "stopped",
                "last_state": r["state"],
                "confirmed_position": r["confirmed_position"],
                "last_replication_at": _iso(r["last_replication_at"]),
                "last_replication_age_seconds": _age(r["last_replication_at"], now),
                "heartbeat_at": _iso(r["heartbeat_at"]),
                "heartbeat_age_seconds": _age(r["heartbeat_at"], now),
                "lag_seconds": r["lag_seconds"] if daemon["running"] else None,
                "last_lag_seconds": r["lag_seconds"],
                "lag_bytes": r["lag_bytes"],
                "changes_applied": r["changes_applied"],
                # Tables being copied online (added to capture, or re-copied after a change).
                "snapshots": [
                    {"table": c["table"], "done": c["done"], "total": c["total"]}
                    for c in copying.get(r["source"], [])
                ],
            }
        )
    return {
        "now": _iso(now),
        "daemon": daemon,
        "capture_mode": cfg.capture.mode,
        "sources": sources,
        "services": services,
        "orders": orders,
    }


def _services(cfg: Config, stored: list[dict[str, Any]], *, running: bool) -> list[dict[str, Any]]:
    """Each service: schedule in words, last run and result, next run (none while the daemon
    is down: nothing will run), breaker, progress."""
    saved = {d["name"]: SimpleNamespace(**d) for d in stored}
    schedules = cfg.schedules.all()
    for name in unconfigured_services(cfg):
        schedules.pop(name, None)
    rows = services_view(schedules, SimpleNamespace(services=saved))
    return [
        {
            "name": r.name,
            "schedule": r.schedule,
            "schedule_expr": r.schedule_expr,
            "last_run_at": _iso(r.last_run_at),
            "last_ok": r.last_ok,
            "last_result": r.last_result,
            "next_runs": [_iso(t) for t in r.next_runs] if running else [],
            "breaker_open": r.breaker_open,
            "progress": r.progress,
            "failures": r.failures,
        }
        for r in rows
    ]


def _orders(store: StagingStore, per_state: int | None) -> dict[str, Any]:
    """Orders by state — delivered, awaiting, failed — newest first (``per_state`` each)."""
    counts = order_counts(store.engine)
    if not counts:
        return {"counts": {}, "latest": {}}
    per = per_state or max(1, max(counts.values()))
    view = orders_view(store.engine, {}, per_page=per)
    latest = {
        col.state: [
            {
                "shop": r["shop"],
                "e_number": r["e_number"],
                "erp_order_no": r.get("erp_order_no"),
                "last_seen": _iso(r.get("last_seen")),
                "last_error": r.get("last_error"),
            }
            for r in col.rows
        ]
        for col in view.columns
    }
    return {"counts": counts, "latest": latest}


# -------------------------------------------------------------------------------- ERP, HA


def slot_lag(cfg: Config) -> list[dict[str, Any]]:
    """Per slot: lag bytes, retained WAL, wal_status, safe_wal_size, and the invalidation risk."""
    try:
        conn = pg_connect(cfg.erp.url, "lag", connect_timeout=cfg.erp.connect_timeout)
    except psycopg.OperationalError as exc:
        raise connect_error("cannot reach the ERP", cfg.erp.redacted, exc) from None
    with conn:
        (keep,) = conn.execute(
            "SELECT setting::bigint * CASE unit WHEN 'MB' THEN 1048576 WHEN 'kB' THEN 1024 ELSE 1 END "
            "FROM pg_settings WHERE name = 'max_slot_wal_keep_size'"
        ).fetchone() or (None,)
        rows = conn.execute(
            "SELECT slot_name, active, active_pid, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag_bytes, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes, "
            "wal_status, safe_wal_size, confirmed_flush_lsn::text "
            "FROM pg_replication_slots WHERE slot_type = 'logical' AND database = current_database() "
            "ORDER BY slot_name"
        ).fetchall()
    out = []
    for name, active, pid, lag_b, retained, wal_status, safe, confirmed in rows:
        warn = None
        if wal_status in ("unreserved", "lost"):
            warn = f"wal_status={wal_status}: the slot is about to be or has been invalidated"
        elif keep is not None and keep >= 0 and safe is not None and keep > 0 and safe < 0.2 * keep:
            warn = (
                f"only {human_bytes(safe)} of WAL left before max_slot_wal_keep_size "
                "invalidates the slot"
            )
        elif not active:
            warn = "slot is not active: no consumer is streaming it, WAL is piling up"
        out.append(
            {
                "slot": name,
                "active": active,
                "active_pid": pid,
                "lag_bytes": lag_b,
                "retained_wal_bytes": retained,
                "wal_status": wal_status,
                "safe_wal_size": safe,
                "confirmed_flush_lsn": confirmed,
                "max_slot_wal_keep_size": keep,
                "warning": warn,
            }
        )
    return out


def scale_out_lines(cfg: Config) -> list[str]:
    """The stream sink's backlog and the HA lease (docs/scale-out.md), when configured."""
    lines: list[str] = []
    if cfg.stream is not None:
        store = StagingStore(cfg.staging_url)
        try:
            n, oldest = 0, None
            if has_table(store.engine, "sync_journal"):  # the daemon creates it, not a reader
                # Here only: the sink loads the NATS client (~40 ms) that a daemon or a status
                # without [stream] never needs.
                from replicator.stream.sink import cursor_name  # noqa: PLC0415 - NATS client

                n, oldest = store.journal.backlog(cursor_name(cfg.stream))
        finally:
            store.dispose()
        lines.append(
            f"stream {cfg.stream.stream} at {cfg.stream.url}: {n} change(s) waiting for the "
            f"stream" + (f", oldest committed {oldest}" if oldest else "")
        )
    if cfg.ha.enabled:
        lines.extend(describe(cfg))
    return lines


def orders_by_shop_and_state(engine: sa.Engine) -> list[tuple[str, str, int]]:
    """``(shop, state, count)`` of the order ledger (the ``sync_orders`` gauge)."""
    stmt = sa.select(ledger_t.c.shop, ledger_t.c.state, sa.func.count()).group_by(
        ledger_t.c.shop, ledger_t.c.state
    )
    with reading(engine) as conn:
        return [(str(shop), str(state), int(n)) for shop, state, n in conn.execute(stmt)]
