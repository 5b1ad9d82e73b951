"""``sync-daemon status`` and ``sync-daemon lag``: what the staging store and the ERP say, printed.

``status`` reads only the staging store (it works while the daemon is down, and tells how old
the facts are); ``lag`` asks the ERP's ``pg_replication_slots`` what the slot retains, for DBAs.
"""

from __future__ import annotations

import datetime as dt
import json
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
    if v is None:
        return None
    return v if isinstance(v, str) else v.isoformat()


def collect_status(cfg: Config) -> dict[str, Any]:
    """The facts ``status`` prints, as a JSON-able dict (no secrets)."""
    store = StagingStore(cfg.staging_url, role="status")
    now = dt.datetime.now(dt.UTC)
    try:
        rows = store.replication_status()
    finally:
        store.dispose()
    sources = []
    for r in rows:
        sources.append(
            {
                "source": r["source"],
                "slot": r["slot"],
                "state": r["state"],
                "confirmed_position": r["confirmed_position"],
                "last_replication_at": _iso(r["last_replication_at"]),
                "last_replication_age_seconds": _age(r["last_replication_at"], now),
                "heartbeat_at": _iso(r["heartbeat_at"]),
                "heartbeat_age_seconds": _age(r["heartbeat_at"], now),
                "lag_seconds": r["lag_seconds"],
                "lag_bytes": r["lag_bytes"],
                "changes_applied": r["changes_applied"],
            }
        )
    return {"now": now.isoformat(), "capture_mode": cfg.capture.mode, "sources": sources}


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
    out = out or sys.stdout
    st = collect_status(cfg)
    if as_json:
        json.dump(st, out, indent=2, default=str)
        out.write("\n")
        return 0
    if not st["sources"]:
        print(
            "capture: no checkpoint yet (the daemon has not finished its first snapshot)", file=out
        )
        return 0
    for s in st["sources"]:
        lag = "unknown" if s["lag_seconds"] is None else f"{s['lag_seconds']:.2f}s"
        lag_b = "" if s["lag_bytes"] is None else f", {s['lag_bytes']} bytes behind"
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
    return 0


def slot_lag(cfg: Config) -> list[dict[str, Any]]:
    """Per slot: lag bytes, retained WAL, wal_status, safe_wal_size, and the invalidation risk."""
    from replicator.db import pg_connect

    with pg_connect(cfg.erp.url, "lag", connect_timeout=cfg.erp.connect_timeout) as conn:
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
                f"only {safe} bytes of WAL left before max_slot_wal_keep_size invalidates the slot"
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
        print(
            f"slot {s['slot']}: {'active' if s['active'] else 'INACTIVE'}, lag {s['lag_bytes']} bytes / "
            f"{lag}, retained WAL {s['retained_wal_bytes']} bytes, wal_status {s['wal_status']}, "
            f"safe_wal_size {s['safe_wal_size'] if s['safe_wal_size'] is not None else 'unlimited'}",
            file=out,
        )
        if s["warning"]:
            print(f"  WARNING: {s['warning']}", file=out)
    return 1 if any(s["warning"] for s in slots) else 0
