"""Command line: parse arguments, load and validate config, configure logging, dispatch.

Core subcommands live here (``run``, ``check-config``, ``status``, ``lag``); feature areas
contribute theirs from modules in :mod:`replicator.commands` (``resync`` from
:mod:`replicator.commands.capture`, ``logs``, the order commands, ...), each exposing
``register(subparsers)``. A handler takes the parsed ``argparse.Namespace`` and returns the exit
code. Exit codes (one per class of failure, see :mod:`replicator.errors`): 0 ok, 1 failure at
run time, 2 usage or configuration error, 3 the source needs a person, 4 access refused, 5 the
daemon is not running (``status``).

Imports: the parser is built from every command module, and ``sync-daemon --help``, ``--version``
or a mistyped option answer at once (~0.05 s) only while nothing has loaded pydantic, SQLAlchemy or
the database drivers (~1 s). So handlers here and in :mod:`replicator.commands` import the
feature modules they run inside the function, each marked ``# noqa: PLC0415 - fast CLI start``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

from replicator import __version__, commands
from replicator.errors import EXIT_ACCESS, EXIT_FAILURE, AccessError, ConfigError, SyncError

DEFAULT_CONFIG = os.environ.get("SYNC_DAEMON_CONFIG", "/etc/sync-daemon/config.toml")

Handler = Callable[[argparse.Namespace], int]


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """Every command that needs the config takes ``--config FILE`` (env SYNC_DAEMON_CONFIG)."""
    p.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )


def load(args: argparse.Namespace) -> Any:
    """Load the config named by ``--config`` and set up logging for a CLI command."""
    from replicator.config import load_config  # noqa: PLC0415 - fast CLI start
    from replicator.log import setup_logging  # noqa: PLC0415 - fast CLI start

    cfg = load_config(args.config)
    setup_logging(cfg.logging, quiet=not getattr(args, "verbose", False))
    return cfg


def _cmd_check_config(args: argparse.Namespace) -> int:
    from replicator.config import load_config, warn_if_world_readable  # noqa: PLC0415 - fast CLI start
    from replicator.log import setup_logging  # noqa: PLC0415 - fast CLI start

    cfg = load_config(args.config)
    setup_logging(cfg.logging, quiet=True)
    warn_if_world_readable(args.config)
    code = 0
    if getattr(args, "connect", False):
        from replicator.preflight import preflight  # noqa: PLC0415 - fast CLI start

        for check in preflight(cfg):
            print(f"{'ok  ' if check.ok else 'FAIL'}  {check.what}: {check.text}")
            code = code or check.exit_code
    summary = (
        f"capture {cfg.capture.mode}, {len(cfg.capture.tables)} table(s), "
        f"staging {cfg.staging_url.split(':', 1)[0]}"
    )
    if code:
        print(f"{args.config}: NOT ready ({summary}): fix the FAIL lines above", file=sys.stderr)
    else:
        print(f"{args.config}: OK ({summary})")
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from replicator.daemon import run_daemon  # noqa: PLC0415 - fast CLI start

    return run_daemon(args.config)


def _cmd_status(args: argparse.Namespace) -> int:
    from replicator.status import print_status  # noqa: PLC0415 - fast CLI start

    cfg = load(args)
    return print_status(cfg, as_json=args.json, show_all=getattr(args, "all", False))


def _cmd_lag(args: argparse.Namespace) -> int:
    from replicator.status import print_lag  # noqa: PLC0415 - fast CLI start

    cfg = load(args)
    return print_lag(cfg, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sync-daemon",
        description="Replicate an ERP database into a staging store and bridge it with a webshop.",
    )
    parser.add_argument("--version", action="version", version=f"sync-daemon {__version__}")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="log to stderr while running CLI commands"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    add_config_arg(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate the configuration without running")
    add_config_arg(p)
    p.add_argument(
        "--connect", action="store_true", help="also connect and check the ERP and staging"
    )
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("status", help="replication status, services and orders")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--all", action="store_true", help="list all orders, not the latest 20 per state"
    )
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("lag", help="per-slot lag, retained WAL and invalidation risk (for DBAs)")
    add_config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_lag)

    for mod in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"replicator.commands.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:
        # A process of its own (``sync-daemon``, ``sync_daemon.py``) that exits now, its work
        # done (the daemon has committed or rolled back and closed its connections): exempt what
        # is loaded from the collector, so that the interpreter's final collections do not walk
        # SQLAlchemy's, pydantic's and sqlglot's object graphs, ~0.5 s of every exit. Callers
        # in-process (tests) pass ``argv`` and keep a normal collector.
        gc.freeze()
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return exc.exit_code
    except SyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        # A command that cannot do what was asked fails with 1; refused access keeps its 4.
        return EXIT_ACCESS if isinstance(exc, AccessError) else EXIT_FAILURE
    except BrokenPipeError:
        # `sync-daemon logs | head`: the reader left; say nothing, as other Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A driver error that no boundary mapped yet: one line, not a traceback (-v shows it).
        from replicator.db import one_line  # noqa: PLC0415 - fast CLI start
        from replicator.errors_map import is_access_refused  # noqa: PLC0415 - fast CLI start

        if getattr(args, "verbose", False):
            raise
        print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return EXIT_ACCESS if is_access_refused(exc) else EXIT_FAILURE
