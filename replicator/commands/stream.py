"""``sync-daemon consume``: keep a mirror from the change stream (NATS JetStream)."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from replicator.cli import add_config_arg


def _cmd_consume(args: argparse.Namespace) -> int:
    from replicator.log import setup_logging  # noqa: PLC0415 - fast CLI start
    from replicator.stream.consumer import StreamConsumer, load_consume_config  # noqa: PLC0415 - fast CLI start

    cfg = load_consume_config(args.config)
    setup_logging(cfg.logging)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    consumer = StreamConsumer(cfg)
    try:
        consumer.run(stop)
    finally:
        consumer.close()
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "consume",
        help="keep a mirror in a staging store from the change stream (no slot on the ERP)",
    )
    add_config_arg(p)
    p.set_defaults(func=_cmd_consume)
