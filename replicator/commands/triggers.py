"""``sync-daemon triggers install|uninstall|status``: the changelog and capture triggers in the ERP.

For trigger capture (``capture.mode = "triggers"``) on PostgreSQL, MariaDB and SQLite ERPs.
``install`` is idempotent and also upgrades triggers of an older version or of a table that
changed; ``uninstall`` removes the triggers, their functions, the changelog and the meta table
(unapplied changes are lost: stop the daemon first); ``status`` prints per table whether the
triggers are present and current and exits 1 when any is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from replicator.cli import add_config_arg, load

if TYPE_CHECKING:
    from replicator.cdc.triggers.dialects import Dialect
    from replicator.config import Config


def _dialect(args: argparse.Namespace) -> tuple[Config, Dialect]:
    # The dialects load the database drivers; see replicator.cli on imports inside handlers.
    from replicator.cdc.triggers.dialects import dialect_for  # noqa: PLC0415 - fast CLI start

    cfg: Config = load(args)
    return cfg, dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)


def _cmd_install(args: argparse.Namespace) -> int:
    from replicator.cdc.triggers.dialects import VERSION, MysqlDialect  # noqa: PLC0415 - fast CLI start

    cfg, d = _dialect(args)
    tables = list(cfg.capture.tables)
    with d.connection("triggers-install") as conn:
        d.install(conn, tables)
        warn = d.cascade_children(conn, tables) if isinstance(d, MysqlDialect) else []
    print(
        f"triggers v{VERSION} installed on {len(tables)} table(s) ({d.name}); "
        f"changelog {d.changelog}"
    )
    if d.name == "mysql":
        print(
            "note: MariaDB fires no trigger for TRUNCATE; use DELETE, or copy the table "
            "again online with `sync-daemon resync --table T`",
            file=sys.stderr,
        )
    for w in warn:
        print(
            f"warning: changes made by a foreign-key action are not captured: {w}", file=sys.stderr
        )
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    cfg, d = _dialect(args)
    if not args.yes:
        print(
            "uninstall drops the capture triggers and the changelog (unapplied changes are "
            "lost). Stop the daemon first. Run again with --yes to proceed.",
            file=sys.stderr,
        )
        return 2
    with d.connection("triggers-uninstall") as conn:
        removed = d.uninstall(conn, list(cfg.capture.tables))
    print(f"triggers removed from {len(removed)} table(s); changelog {d.changelog} dropped")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cfg, d = _dialect(args)
    with d.connection("triggers-status") as conn:
        rows = d.status(conn, list(cfg.capture.tables))
    if args.json:
        print(json.dumps([{"table": r.table, "state": r.state, "detail": r.detail} for r in rows]))
    else:
        width = max([len(r.table) for r in rows] + [5])
        print(f"{'TABLE':<{width}}  {'STATE':<9}  DETAIL")
        for r in rows:
            print(f"{r.table:<{width}}  {r.state:<9}  {r.detail}")
    return 0 if all(r.state == "current" for r in rows) else 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("triggers", help="install, remove or check the capture triggers")
    sub = p.add_subparsers(dest="triggers_command", metavar="ACTION", required=True)
    q = sub.add_parser("install", help="create or upgrade the changelog and triggers (idempotent)")
    add_config_arg(q)
    q.set_defaults(func=_cmd_install)
    q = sub.add_parser("uninstall", help="drop the triggers and the changelog")
    add_config_arg(q)
    q.add_argument("--yes", action="store_true", help="really do it")
    q.set_defaults(func=_cmd_uninstall)
    q = sub.add_parser("status", help="per table: triggers present and current?")
    add_config_arg(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_cmd_status)
