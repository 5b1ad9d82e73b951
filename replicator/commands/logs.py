"""``sync-daemon logs``: recent log records from the staging store's ``log_records`` table.

    sync-daemon logs --config F [--service NAME] [--level error] [--since 1h|30m|2d|ISO]
                     [--limit N] [--json]

Records print oldest first, the newest ``--limit`` of those matching; ``--level`` means that level
and above; ``--json`` prints one JSON object per line (for ``jq``). The records come from the
read model (:func:`replicator.ops.readmodel.read_logs`); this module parses the options and
formats. The command only reads: it does not create the table, so pointing it at the wrong store
changes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from replicator.cli import add_config_arg, load

_SPAN = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``1h``, ``2d``, ``1w`` ago, or an ISO date/time (naive = local time)."""
    now = now or datetime.now(UTC)
    m = _SPAN.match(text.strip().lower())
    if m:
        return now - timedelta(**{_UNIT[m.group(2)]: int(m.group(1))})
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a span like 30m, 1h, 2d or an ISO time like 2026-11-22T06:00"
        ) from None
    if at.tzinfo is None:
        at = at.astimezone()  # an operator types local time
    return at.astimezone(UTC)


def _level(text: str) -> str:
    from replicator.logstore import normalize_level  # noqa: PLC0415 - fast CLI start

    try:
        return normalize_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number")
    return int(text)


def _format_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return json.dumps(text) if (" " in text or not text) else text


def _cmd_logs(args: argparse.Namespace) -> int:
    from replicator.ops.readmodel import read_logs  # noqa: PLC0415 - fast CLI start

    cfg = load(args)
    records = read_logs(
        cfg.staging_url, service=args.service, level=args.level, since=args.since, limit=args.limit
    )
    if records is None:
        print("no log records yet (the daemon creates log_records on its first start)")
        return 0
    for r in records:
        if args.json:
            print(json.dumps(r.as_dict(), default=str))
            continue
        at = r.at.strftime("%Y-%m-%d %H:%M:%S")
        extra = " ".join(f"{k}={_format_value(v)}" for k, v in r.fields.items())
        line = f"{at}Z {r.level.upper():<8} {r.service or '-':<10} {r.event}"
        print(f"{line}  {extra}" if extra else line)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("logs", help="recent log records from the staging store")
    add_config_arg(p)
    p.add_argument("--service", metavar="NAME", help="only this service (capture, orders, ...)")
    p.add_argument("--level", type=_level, metavar="LEVEL", help="this level and above (error)")
    p.add_argument("--since", type=parse_since, metavar="WHEN", help="30m, 1h, 2d or ISO time")
    p.add_argument("--limit", type=_limit, default=200, metavar="N", help="at most N (200)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_logs)
