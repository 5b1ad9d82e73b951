"""CLI commands of the order import.

``download`` (run a cycle now, restarting a cancelled shop), ``orders`` (list by state), ``order``
(details and timeline), ``retry``, ``updates`` / ``accept`` / ``ignore`` / ``cancel`` (changed
orders), ``gaps`` and ``map --dry-run``. Each handler loads the config with
:func:`replicator.cli.load` and calls a ``run_*`` function taking the built config, so tests can
run the same code with a config they made. Exit codes: 0 ok, 1 failure, 2 usage/config error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from replicator.cli import add_config_arg, load

_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str) -> datetime:
    """ISO date/time (UTC when no zone) or a relative age such as ``2h``, ``3d``, ``90m``."""
    m = _REL.match(text.strip())
    if m:
        return datetime.now(UTC).replace(tzinfo=None) - timedelta(**{_UNITS[m[2]]: float(m[1])})
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use ISO time (2026-11-22T06:00) or an age (2h, 3d)"
        ) from None
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


@contextmanager
def _open_service(cfg: Any, connectors: dict[str, Any] | None = None) -> Iterator[Any]:
    """The order import service for one command, closed when the command is done."""
    # Deferred import (PLC0415): the CLI imports every command module to register it; the order
    # import (SQLAlchemy, the ERP writers, the connectors) loads only when a command runs.
    from replicator.orders.coordinator import OrderImportService  # noqa: PLC0415 - fast CLI start

    svc = OrderImportService(cfg, connectors)
    try:
        yield svc
    finally:
        svc.close()


@contextmanager
def _open_ledger(cfg: Any) -> Iterator[Any]:
    """The order ledger in the staging store, for one reading command, closed afterwards."""
    from replicator.orders.ledger import Ledger  # noqa: PLC0415 - fast CLI start

    led = Ledger(cfg.staging_url)
    try:
        yield led
    finally:
        led.close()


def _fmt(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------------------- runners


def run_download(
    cfg: Any,
    args: argparse.Namespace,
    out: TextIO | None = None,
    connectors: dict[str, Any] | None = None,
) -> int:
    out = out or sys.stdout
    with _open_service(cfg, connectors) as svc:
        # Every shop: those polled, and those whose orders only arrive by webhook (worked off).
        shops = (
            [args.shop]
            if getattr(args, "shop", None)
            else [*svc.connectors, *(s.name for s in cfg.shops if s.name not in svc.connectors)]
        )
        for s in shops:
            svc.actions.restart_shop(s)
        r = svc.run_cycle(since=args.since, until=args.until, force=True, shops=shops)
        print(f"download: {r.summary()}", file=out)
        for n in r.skipped_orders:
            print(f"  skipped  {n.shop}/{n.e_number}: {n.reason}", file=out)
        for n in r.errored_orders:
            print(f"  errored  {n.shop}/{n.e_number}: {n.reason}", file=out)
        for shop, status in r.shops.items():
            print(f"shop {shop}: {status}", file=out)
        return 0 if r.ok else 1


def run_orders(cfg: Any, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with _open_ledger(cfg) as led:
        rows = led.list_orders(state=args.status, shop=args.shop, limit=args.limit)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "shop": e.shop,
                            "e_number": e.e_number,
                            "state": e.state,
                            "erp_order_no": e.erp_order_no,
                            "attempts": e.attempts,
                            "last_error": e.last_error,
                            "last_seen": _fmt(e.last_seen),
                        }
                        for e in rows
                    ],
                    indent=2,
                ),
                file=out,
            )
            return 0
        counts = led.counts(args.shop)
        print(
            "orders: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"),
            file=out,
        )
        for st in led.shop_states():
            if st.cancelled:
                print(
                    f"shop {st.shop}: {st.cancelled_reason} (next probe {_fmt(st.next_probe_at)}; "
                    "sync-daemon download restarts it)",
                    file=out,
                )
        if rows:
            # Newest first (by first seen: last seen moves every cycle, it orders nothing).
            print(
                f"{'SHOP':<12} {'E-NUMBER':<14} {'STATE':<15} {'ERP ORDER':<12} "
                f"{'FIRST SEEN (UTC)':<19}  WHY",
                file=out,
            )
        for e in rows:
            reason = e.last_error if e.last_error and e.state != "delivered" else ""
            print(
                f"{e.shop:<12} {e.e_number:<14} {e.state:<15} {e.erp_order_no or '-':<12} "
                f"{_fmt(e.first_seen):<19}  {reason}".rstrip(),
                file=out,
            )
        return 0


def describe(entry: Any) -> dict[str, Any]:
    """The ledger row as plain data (for ``sync-daemon order`` and JSON output)."""
    return {
        "shop": entry.shop,
        "e_number": entry.e_number,
        "state": entry.state + (" (queued for accept)" if entry.update_queued else ""),
        "erp_order_no": entry.erp_order_no,
        "attempts": entry.attempts,
        "last_error": entry.last_error,
        "shop_status": entry.shop_status,
        "first_seen": entry.first_seen,
        "last_seen": entry.last_seen,
        "payload_bytes": len(entry.payload),
        "payload_hash": entry.payload_hash,
        "diff": json.loads(entry.diff) if entry.diff else None,
    }


def run_order(cfg: Any, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with _open_ledger(cfg) as led:
        found = led.find(args.e_number, args.shop)
        if not found:
            print(f"no order {args.e_number!r} in the ledger", file=sys.stderr)
            return 1
        for entry in found:
            d = describe(entry)
            events = led.events(entry.shop, entry.e_number)
            if args.json:
                d["timeline"] = [
                    {"at": _fmt(ev.at), "event": ev.event, "detail": ev.detail} for ev in events
                ]
                print(json.dumps(d, indent=2, default=str), file=out)
                continue
            for k in (
                "shop",
                "e_number",
                "state",
                "erp_order_no",
                "shop_status",
                "attempts",
                "last_error",
                "first_seen",
                "last_seen",
                "payload_bytes",
            ):
                v = d[k]
                shown = _fmt(v) if isinstance(v, datetime) else "-" if v is None else v
                print(f"{k.replace('_', ' '):<14} {shown}", file=out)
            if d["diff"]:
                print("pending update:", file=out)
                for c in d["diff"]:
                    print(f"  {c['field']}: {c['old']!r} -> {c['new']!r}", file=out)
            print("timeline:", file=out)
            for ev in events:
                print(
                    f"  {_fmt(ev.at)}  {ev.event}" + (f": {ev.detail}" if ev.detail else ""),
                    file=out,
                )
        return 0


def run_retry(cfg: Any, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with _open_service(cfg, {}) as svc:
        entry = svc.actions.retry(args.e_number, args.shop)
        if entry is None:
            return 1
        line = f"{entry.shop}/{entry.e_number}: {entry.state}"
        if entry.erp_order_no:
            line += f" (ERP order {entry.erp_order_no})"
        if entry.state in ("failed", "skipped", "awaiting") and entry.last_error:
            line += f": {entry.last_error}"
        print(line, file=out)
        return 0 if entry.state == "delivered" else 1


def run_updates(cfg: Any, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with _open_ledger(cfg) as led:
        rows = led.list_orders(state="update-pending", shop=args.shop)
        if not rows:
            print("no pending updates", file=out)
        for e in rows:
            print(
                f"{e.shop}/{e.e_number} ERP order {e.erp_order_no}: {e.last_error or 'waiting'}",
                file=out,
            )
            for c in json.loads(e.diff or "[]"):
                print(f"    {c['field']}: {c['old']!r} -> {c['new']!r}", file=out)
        return 0


def _simple(action: str) -> Callable[[Any, argparse.Namespace, TextIO | None], int]:
    def run(cfg: Any, args: argparse.Namespace, out: TextIO | None = None) -> int:
        out = out or sys.stdout
        with _open_service(cfg, {}) as svc:
            if action == "accept":
                res = svc.actions.accept(args.e_number, args.shop, force=args.force)
                print(
                    f"{args.e_number}: update accepted, ERP order {res.order_number} replaced"
                    + (" (forced)" if args.force else ""),
                    file=out,
                )
            elif action == "ignore":
                svc.actions.ignore(args.e_number, args.shop)
                print(f"{args.e_number}: update ignored", file=out)
            else:
                order_no = svc.actions.cancel(args.e_number, args.shop)
                print(f"{args.e_number}: ERP order {order_no} marked cancelled", file=out)
            return 0

    return run


run_accept, run_ignore, run_cancel = _simple("accept"), _simple("ignore"), _simple("cancel")


def run_gaps(
    cfg: Any,
    args: argparse.Namespace,
    out: TextIO | None = None,
    connectors: dict[str, Any] | None = None,
) -> int:
    from replicator.orders.gaps import find_gaps  # noqa: PLC0415 - fast CLI start

    out = out or sys.stdout
    with _open_service(cfg, connectors) as svc:
        names = (
            [args.shop]
            if args.shop
            else sorted({s.name for s in cfg.shops} | {st.shop for st in svc.ledger.shop_states()})
        )
        dirty = False
        for shop in names:
            others: set[str] = set()
            for other in names:
                if other != shop:
                    others |= {e for e, _, _ in svc.ledger.e_numbers(other)}
            conn = svc.connectors.get(shop) if (connectors is not None or cfg.shops) else None
            since = args.since or parse_time("7d")
            rep = find_gaps(shop, svc.ledger, svc.writer_for(shop), since, conn, others)
            print(f"shop {shop}:", file=out)
            print(
                "  missing e-numbers in series: "
                + (", ".join(map(str, rep.missing_numbers)) or "none"),
                file=out,
            )
            print(
                "  in the shop but not in the ERP: "
                + (", ".join(f"{e} ({s})" for e, s in rep.not_in_erp) or "none"),
                file=out,
            )
            print(
                "  in the ERP but unknown to the shop: "
                + (", ".join(rep.unknown_to_shop) or "none"),
                file=out,
            )
            dirty = dirty or not rep.clean
        return 1 if dirty else 0


def run_map(cfg: Any, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Map one order file and print the rows that would be written (nothing is written)."""
    out = out or sys.stdout
    # Deferred imports: see _open_service.
    from replicator.db import make_engine  # noqa: PLC0415 - fast CLI start
    from replicator.mappers.orders import OrderRejected  # noqa: PLC0415 - fast CLI start
    from replicator.mappers.plan import PlanMapping, load_any, validate_any  # noqa: PLC0415 - fast CLI start
    from replicator.orders.inbox import PayloadError, e_number_from, parse_payload  # noqa: PLC0415 - fast CLI start
    from replicator.orders.plan_writer import PlanWriter  # noqa: PLC0415 - fast CLI start
    from replicator.orders.writer import ErpWriter  # noqa: PLC0415 - fast CLI start

    if not args.dry_run:
        print("map only supports --dry-run (it never writes)", file=sys.stderr)
        return 2
    raw = Path(args.order).read_bytes()
    shop = args.shop or (cfg.shops[0].name if cfg.shops else "default")
    mapping = load_any(
        cfg.resolve_path(args.mapping or cfg.orders.mapping_for(shop)), cfg.erp.dialect
    )
    engine = make_engine(cfg.erp.writer_url, "orders-map")
    try:
        validate_any(mapping, engine)
        try:
            payload = parse_payload(raw)
        except PayloadError as exc:
            print(f"{args.order}: {exc}", file=sys.stderr)
            return 1
        e = args.e_number or e_number_from(payload, cfg.orders.e_number_fields) or "?"
        if isinstance(mapping, PlanMapping):
            # The plan runs for real in a transaction that is rolled back: generated keys,
            # lookups and the ERP's numbering show what an import would write.
            plan_writer = PlanWriter(engine, mapping)
            with engine.connect() as conn:
                try:
                    tables = plan_writer.dry_run(
                        conn, shop, e, payload, cfg.orders.criteria_for(shop).mode == "auto_invoice"
                    )
                except OrderRejected as exc:
                    print(f"{args.order}: cannot map: {exc.reason}", file=sys.stderr)
                    return 1
            for table, rows in tables.items():
                print(f"-- {table} ({len(rows)} row{'s' if len(rows) != 1 else ''})", file=out)
                for row in rows:
                    print(json.dumps(row, default=str, ensure_ascii=False), file=out)
            print("-- (rolled back: nothing was written)", file=out)
            return 0
        writer = ErpWriter(engine, mapping)
        crit = cfg.orders.criteria_for(shop)
        with engine.connect() as conn:
            try:
                mapped = writer.map(conn, shop, e, payload, crit.mode == "auto_invoice")
            except OrderRejected as exc:
                print(f"{args.order}: cannot map: {exc.reason}", file=sys.stderr)
                return 1
            finally:
                conn.rollback()
        header = dict(mapped.header)
        header[mapping.order_number_column] = "<assigned at import>"
        if mapping.customer_column:
            c = mapped.customer
            header[mapping.customer_column] = (
                "<guest>"
                if c and c.guest
                else f"<match/create: {c.email or c.number}>"
                if c
                else None
            )
        print(f"-- {mapping.header_table} (1 row)", file=out)
        print(json.dumps(header, indent=2, default=str, ensure_ascii=False), file=out)
        print(f"-- {mapping.lines_table} ({len(mapped.lines)} rows)", file=out)
        for ln in mapped.lines:
            print(
                json.dumps(
                    {**ln, mapping.lines_order_column: "<order number>"},
                    default=str,
                    ensure_ascii=False,
                ),
                file=out,
            )
        if mapped.customer and not mapped.customer.guest and mapped.customer.columns:
            print(
                f"-- {mapping.customer.table if mapping.customer else ''} (if no customer matches)",
                file=out,
            )
            print(json.dumps(mapped.customer.columns, default=str, ensure_ascii=False), file=out)
        return 0
    finally:
        engine.dispose()


# -------------------------------------------------------------------------------------- handlers


def _handler(run: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    def handle(args: argparse.Namespace) -> int:
        return run(load(args), args)

    return handle


def register(subparsers: Any) -> None:
    def add(name: str, help: str, run: Callable[..., int]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subparsers.add_parser(name, help=help)
        add_config_arg(p)
        p.set_defaults(func=_handler(run), run=run)
        return p

    def shop_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--shop", help="the shop (needed when an e-number exists in several shops)")

    p = add("download", "download and import orders now (restarts a cancelled shop)", run_download)
    p.add_argument("--since", type=parse_time, help="from this time (ISO, or an age like 2h, 3d)")
    p.add_argument("--until", type=parse_time, help="up to this time (default: now)")
    shop_arg(p)

    p = add("orders", "list orders of the import ledger", run_orders)
    p.add_argument(
        "--status", choices=["awaiting", "delivered", "failed", "skipped", "update-pending"]
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    shop_arg(p)

    p = add("order", "details and timeline of one order", run_order)
    p.add_argument("e_number", metavar="E-NUMBER")
    p.add_argument("--json", action="store_true")
    shop_arg(p)

    p = add("retry", "import a failed or skipped order again now", run_retry)
    p.add_argument("e_number", metavar="E-NUMBER")
    shop_arg(p)

    p = add("updates", "list orders changed in the shop after import", run_updates)
    shop_arg(p)

    p = add("accept", "apply a pending update to the ERP order (same order number)", run_accept)
    p.add_argument("e_number", metavar="E-NUMBER")
    p.add_argument("--force", action="store_true", help="even when the ERP order is posted")
    shop_arg(p)

    p = add("ignore", "drop a pending update; the ERP order stays as imported", run_ignore)
    p.add_argument("e_number", metavar="E-NUMBER")
    shop_arg(p)

    p = add("cancel", "mark the ERP order of an e-number cancelled", run_cancel)
    p.add_argument("e_number", metavar="E-NUMBER")
    shop_arg(p)

    p = add(
        "gaps",
        "e-numbers missing in the series, in the shop but not the ERP, and vice versa",
        run_gaps,
    )
    p.add_argument(
        "--since", type=parse_time, help="look at orders since (default: 7d)", default=None
    )
    shop_arg(p)

    p = add("map", "map an order JSON file and print the ERP rows (nothing is written)", run_map)
    p.add_argument("order", metavar="ORDER.json")
    p.add_argument("--dry-run", action="store_true", required=True)
    p.add_argument("--mapping", help="mapping file (default: orders.mapping of the config)")
    p.add_argument("--e-number", help="e-number to use (default: read from the order)")
    shop_arg(p)
