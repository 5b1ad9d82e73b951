"""``sync-daemon resync``: start capture over on purpose, or copy one table again online.

    sync-daemon resync --config F --yes          drop and recreate the slot, take a new snapshot
    sync-daemon resync --config F --table S.T    ask the daemon to copy one table again, online

Both are operator actions on capture, run from the CLI; the daemon's loop
(:mod:`replicator.daemon`) only notices their effect (a new slot and checkpoint, or a recopy
request in the checkpoint, which the capture source picks up while it streams).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from replicator.cli import add_config_arg, load

if TYPE_CHECKING:
    from replicator.config import Config


def resync(cfg: Config) -> None:
    """Drop and recreate the slot and take a new snapshot (``sync-daemon resync``)."""
    from replicator.cdc.logical import LogicalSource  # noqa: PLC0415 - fast CLI start
    from replicator.errors import FatalError  # noqa: PLC0415 - fast CLI start
    from replicator.staging import StagingStore  # noqa: PLC0415 - fast CLI start

    store = StagingStore(cfg.staging_url)
    if cfg.capture.mode != "logical":
        raise FatalError("resync applies to capture.mode = 'logical'")
    src = LogicalSource(cfg, store)
    try:
        src.resync()
    finally:
        src.close()
        store.dispose()


def request_recopy(cfg: Config, table: str) -> str:
    """``sync-daemon resync --table T``: ask the daemon to copy one table again, online."""
    from replicator.errors import ConfigError  # noqa: PLC0415 - fast CLI start
    from replicator.staging import StagingStore  # noqa: PLC0415 - fast CLI start

    # Both capture modes take the request: logical capture with watermarked chunks, trigger
    # capture with a chunk per changelog batch (its read transaction is the chunk's snapshot).
    if table not in cfg.capture.tables:
        raise ConfigError(
            f"resync --table: {table!r} is not in capture.tables ({', '.join(cfg.capture.tables)})"
        )
    store = StagingStore(cfg.staging_url)
    try:
        store.request_recopy("erp", table)
    finally:
        store.dispose()
    return (
        f"resync: {table} will be copied again online while capture streams; "
        "`sync-daemon status` shows its progress (a stopped daemon starts it when it runs)"
    )


def _cmd_resync(args: argparse.Namespace) -> int:
    cfg = load(args)
    if args.table:
        print(request_recopy(cfg, args.table))
        return 0
    if not args.yes:
        print(
            "resync drops the replication slot and the staging mirror, then takes a new snapshot.\n"
            "Stop the daemon first. Run again with --yes to proceed.",
            file=sys.stderr,
        )
        return 2
    resync(cfg)
    print("resync: new slot created and snapshot taken; start the daemon to resume streaming")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "resync", help="drop and recreate the slot, take a new snapshot (on purpose)"
    )
    add_config_arg(p)
    p.add_argument("--yes", action="store_true", help="really do it")
    p.add_argument(
        "--table",
        metavar="SCHEMA.TABLE",
        help="copy one captured table again, online, while the daemon streams (no slot change)",
    )
    p.set_defaults(func=_cmd_resync)
