"""``sync-daemon status`` and ``sync-daemon lag``: what the staging store and the ERP say, printed.

``status`` reads only the staging store (it works while the daemon is down, and tells how old
the facts are); ``lag`` asks the ERP's ``pg_replication_slots`` what the slot retains, for DBAs.
The facts come from the read model (:mod:`replicator.ops.readmodel`), which the Manage page and
``/metrics`` share; this module only formats them for a terminal.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

from replicator.cdc import pgoutput
from replicator.config import Config
from replicator.ops.format import human_bytes as pretty_bytes
from replicator.ops.readmodel import (
    ORDER_STATES,
    collect_status,
    daemon_liveness,
    scale_out_lines,
    slot_lag,
)

__all__ = [
    "EXIT_NOT_RUNNING",
    "collect_status",
    "daemon_liveness",
    "human_bytes",
    "print_lag",
    "print_status",
    "scale_out_lines",
    "slot_lag",
]


# Exit code of ``status`` when the daemon is not running (or its liveness mark is stale).
EXIT_NOT_RUNNING = 5


_COLOURS = {"delivered": "32", "awaiting": "34", "failed": "31", "ok": "32", "fail": "31"}


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
        decoder = f", {pgoutput.DECODER} decoder" if st["capture_mode"] == "logical" else ""
        print(
            f"capture {s['source']} ({st['capture_mode']}, slot {s['slot']}{decoder}): {s['state']}",
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
    for line in scale_out_lines(cfg):
        print(line, file=out)
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


def human_bytes(n: int | float | None) -> str:
    """Bytes for a person (kB/MB/GB, 1024-based), "unknown" when not measured."""
    return "unknown" if n is None else pretty_bytes(n)


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
