"""``sync-daemon status`` and ``sync-daemon lag``: what the staging store and the ERP say, printed.

``status`` reads only the staging store (it works while the daemon is down, and tells how old
the facts are); ``lag`` asks the ERP's ``pg_replication_slots`` what the slot retains, for DBAs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
from typing import Any

from replicator.config import Config
from replicator.staging import StagingStore


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


# Exit code of ``status`` when the daemon is not running (or its liveness mark is stale).
EXIT_NOT_RUNNING = 5


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


ORDER_STATES = ("delivered", "awaiting", "failed")
_COLOURS = {"delivered": "32", "awaiting": "34", "failed": "31", "ok": "32", "fail": "31"}


def collect_status(cfg: Config, *, per_state: int | None = 20) -> dict[str, Any]:
    """The facts ``status`` prints, as a JSON-able dict (no secrets)."""
    store = StagingStore(cfg.staging_url, role="status")
    now = dt.datetime.now(dt.UTC)
    try:
        rows = store.replication_status()
        copying = {}
        for r in rows:
            cp = store.load_checkpoint(r["source"])
            copying[r["source"]] = (cp.extra if cp else {}).get("copying", [])
        daemon = daemon_liveness(store.load_liveness(), now)
        services = _services(cfg, store, running=daemon["running"])
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


def _services(cfg: Config, store: StagingStore, *, running: bool) -> list[dict[str, Any]]:
    """Each service: schedule in words, last run and result, next run (none while the daemon
    is down: nothing will run), breaker, progress."""
    from types import SimpleNamespace

    from replicator.web.views import services_view

    saved = {d["name"]: SimpleNamespace(**d) for d in store.load_services()}
    from replicator.web.views import unconfigured_services

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
    from replicator.web.views import order_counts, orders_view

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


def _short(iso: str | None) -> str:
    """A timestamp for a terminal: local time to the second."""
    if not iso:
        return "never"
    return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _paint(text: str, key: str, out: Any) -> str:
    if not getattr(out, "isatty", lambda: False)():
        return text
    return f"\x1b[{_COLOURS.get(key, '0')}m{text}\x1b[0m"


def _fmt_age(v: float | None) -> str:
    if v is None:
        return "never"
    if v < 120:
        return f"{v:.0f}s ago"
    if v < 7200:
        return f"{v / 60:.0f}m ago"
    return f"{v / 3600:.1f}h ago"


def print_status(
    cfg: Config, *, as_json: bool = False, show_all: bool = False, out: Any = None
) -> int:
    """The Manage page in a terminal: capture, services, orders by state (coloured on a TTY)."""
    out = out or sys.stdout
    st = collect_status(cfg, per_state=None if show_all else 20)
    daemon = st["daemon"]
    code = 0 if daemon["running"] else EXIT_NOT_RUNNING
    if as_json:
        json.dump(st, out, indent=2, default=str)
        out.write("\n")
        return code
    if daemon["running"]:
        print(f"daemon running (pid {daemon['pid']}, since {_short(daemon['since'])})", file=out)
    elif daemon["since"] is None:
        print(
            _paint("daemon not running (it never ran with this staging store)", "fail", out),
            file=out,
        )
    else:
        print(
            _paint(
                f"daemon not running since {_short(daemon['since'])} ({daemon['reason']}, "
                f"pid {daemon['pid']}); the figures below are as it left them",
                "fail",
                out,
            ),
            file=out,
        )
    if not st["sources"]:
        print(
            "capture: no checkpoint yet (the daemon has not finished its first snapshot)", file=out
        )
    for s in st["sources"]:
        lag = "unknown" if s["lag_seconds"] is None else f"{s['lag_seconds']:.2f}s"
        if not daemon["running"]:
            lag = "unknown (daemon not running)"
        lag_b = "" if s["lag_bytes"] is None else f", {human_bytes(s['lag_bytes'])} behind"
        print(
            f"capture {s['source']} ({st['capture_mode']}, slot {s['slot']}): {s['state']}",
            file=out,
        )
        print(
            f"  last replication  {s['last_replication_at'] or 'never'} "
            f"({_fmt_age(s['last_replication_age_seconds'])})",
            file=out,
        )
        print(f"  heartbeat         {_fmt_age(s['heartbeat_age_seconds'])}", file=out)
        print(f"  lag               {lag}{lag_b}", file=out)
        print(
            f"  position          {s['confirmed_position']}  ({s['changes_applied']} changes applied)",
            file=out,
        )
        for snap in s["snapshots"]:
            print(
                f"  snapshot          {snap['table']}: {snap['done']:,} of {snap['total']:,} rows",
                file=out,
            )
    if st["services"]:
        print("\nservices", file=out)
        for sv in st["services"]:
            if sv["last_ok"] is None:
                result = ""
            else:
                result = _paint("ok", "ok", out) if sv["last_ok"] else _paint("FAILED", "fail", out)
            nxt = _short(sv["next_runs"][0]) if sv["next_runs"] else "-"
            if not daemon["running"]:
                nxt = "- (daemon not running)"
            line = f"  {sv['name']:<13} {sv['schedule']:<26} last {_short(sv['last_run_at'])}"
            line += f"  {result} {sv['last_result'] or ''}".rstrip()
            if sv["breaker_open"]:
                line += "  " + _paint("BREAKER OPEN", "fail", out)
            print(line, file=out)
            extra = f"  progress: {sv['progress']}" if sv["progress"] else ""
            print(f"  {'':<13} next {nxt}{extra}", file=out)
    orders = st["orders"]
    if orders["counts"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(orders["counts"].items()))
        print(f"\norders ({counts})", file=out)
        for state in ORDER_STATES:
            rows = orders["latest"].get(state, [])
            if not rows:
                continue
            print(
                "  " + _paint(f"{state} ({orders['counts'].get(state, 0)})", state, out), file=out
            )
            for r in rows:
                erp = f" -> ERP {r['erp_order_no']}" if r["erp_order_no"] else ""
                why = f"  {r['last_error']}" if state == "failed" and r["last_error"] else ""
                print(f"    {r['shop']}/{r['e_number']}{erp}{why}", file=out)
    return code


def slot_lag(cfg: Config) -> list[dict[str, Any]]:
    """Per slot: lag bytes, retained WAL, wal_status, safe_wal_size, and the invalidation risk."""
    import psycopg

    from replicator.db import connect_error, pg_connect

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


def human_bytes(n: int | float | None) -> str:
    """Bytes for a person (kB/MB/GB, 1024-based), "unknown" when not measured."""
    from replicator.web.lag import human_bytes as pretty

    return "unknown" if n is None else pretty(n)


def print_lag(cfg: Config, *, as_json: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    slots = slot_lag(cfg)
    st = collect_status(cfg)
    lag_s = {s["slot"]: s["lag_seconds"] for s in st["sources"]}
    for s in slots:
        s["lag_seconds"] = lag_s.get(s["slot"])
    if as_json:
        json.dump(slots, out, indent=2, default=str)
        out.write("\n")
        return 1 if any(s["warning"] for s in slots) else 0
    if not slots:
        print("no logical replication slots in this database", file=out)
    for s in slots:
        lag = "unknown" if s["lag_seconds"] is None else f"{s['lag_seconds']:.2f}s"
        safe = "unlimited" if s["safe_wal_size"] is None else human_bytes(s["safe_wal_size"])
        print(
            f"slot {s['slot']}: {'active' if s['active'] else 'INACTIVE'}, lag "
            f"{human_bytes(s['lag_bytes'])} / {lag}, retained WAL "
            f"{human_bytes(s['retained_wal_bytes'])}, wal_status {s['wal_status']}, "
            f"safe_wal_size {safe}",
            file=out,
        )
        if s["warning"]:
            print(f"  WARNING: {s['warning']}", file=out)
    return 1 if any(s["warning"] for s in slots) else 0
