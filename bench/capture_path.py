"""Benchmark: the logical source's per-change path in process, CPU per change, no ERP server.

pgoutput CopyBoth frames are built in memory (the table and workloads of
``bench/logical_replication.py``: ``bench (id bigint, sku text, qty int, price numeric(12,2),
at timestamptz)``), then fed to :meth:`LogicalSource._handle_frame` as the stream loop would:
walsender frame → decoder → ``_apply_row`` → :class:`ApplyPipeline` → :class:`ApplyTxn` →
flushes and batch commits (with the checkpoint) into SQLite staging (or, with
``--postgresql``, a fresh database on that PostgreSQL server, whose own CPU is not counted).
Workloads, in one run:
large transactions of inserts and then of updates, and small transactions of 1-10 inserts.
The figure is process CPU time (``time.process_time``) per row change, the best of
``--repeat`` runs, so other load on the machine disturbs it less than a wall clock; the slot
feedback is not sent (no server). ``--profile`` prints a cProfile of one run instead;
``SYNC_BENCH_CODE=DIR`` runs the code of another checkout (before/after comparisons).
Nothing is asserted.

Usage: python bench/capture_path.py [--changes 100000] [--repeat 3] [--batch 5000] [--profile]
                                   [--postgresql HOST:PORT]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

ROOT = Path(os.environ.get("SYNC_BENCH_CODE") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from replicator.cdc import pgoutput  # noqa: E402
from replicator.cdc.logical import LogicalSource  # noqa: E402
from replicator.changes import Column, TableSchema  # noqa: E402
from replicator.config import parse_config  # noqa: E402
from replicator.staging import StagingStore  # noqa: E402

OID = 16384
COLUMNS = [
    ("id", "bigint", 20),
    ("sku", "text", 25),
    ("qty", "integer", 23),
    ("price", "numeric(12,2)", 1700),
    ("at", "timestamp with time zone", 1184),
]
SCHEMA = TableSchema(
    "public", "bench", tuple(Column(n, t, o, n != "id") for n, t, o in COLUMNS), ("id",)
)


def _cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def _tuple(values: list[bytes | None]) -> bytes:
    out = [struct.pack("!H", len(values))]
    for v in values:
        out.append(b"n" if v is None else b"t" + struct.pack("!I", len(v)) + v)
    return b"".join(out)


def _frame(lsn: int, msg: bytes) -> bytes:
    return b"w" + struct.pack("!QQQ", lsn, lsn + 1, 0) + msg


def _row(i: int, qty: int) -> list[bytes | None]:
    return [
        str(i).encode(),
        f"SKU-{i}".encode(),
        str(qty).encode(),
        f"{i % 1000}.25".encode(),
        b"2026-11-26 14:00:00.123456+00",
    ]


def frames(changes: int) -> list[bytes]:
    """Relation, then: a third of the changes as inserts in large transactions, a third as
    updates of those rows in large transactions, a third as small transactions of 1-10
    inserts."""
    out: list[bytes] = []
    lsn = 1000
    rel = struct.pack("!I", OID) + _cstr("public") + _cstr("bench") + b"d"
    rel += struct.pack("!H", len(COLUMNS))
    for name, _, oid in COLUMNS:
        rel += bytes([1 if name == "id" else 0]) + _cstr(name) + struct.pack("!Ii", oid, -1)
    out.append(_frame(lsn, b"R" + rel))
    third = changes // 3
    big = max(1, third // 4)

    def txn(msgs: list[bytes]) -> None:
        nonlocal lsn
        final = lsn + len(msgs) + 2
        out.append(_frame(lsn, b"B" + struct.pack("!QqI", final, 0, 1)))
        for m in msgs:
            lsn += 1
            out.append(_frame(lsn, m))
        lsn += 2
        out.append(_frame(lsn, b"C" + struct.pack("!BQQq", 0, final, final + 1, 0)))
        lsn += 1

    rid = struct.pack("!I", OID)
    for start in range(0, third, big):
        txn([b"I" + rid + b"N" + _tuple(_row(i, 1)) for i in range(start, min(third, start + big))])
    for start in range(0, third, big):
        txn([b"U" + rid + b"N" + _tuple(_row(i, 2)) for i in range(start, min(third, start + big))])
    i = n = 0
    base = 10_000_000
    while n < third:
        k = min(third - n, 1 + (i * 7919) % 10)
        txn([b"I" + rid + b"N" + _tuple(_row(base + n + j, 1)) for j in range(k)])
        n += k
        i += 1
    return out


def run(
    data: list[bytes],
    batch: int,
    profile: cProfile.Profile | None = None,
    pg_server: str | None = None,
) -> float:
    """CPU seconds to feed ``data`` into a fresh staging store: SQLite, or a fresh database on
    the PostgreSQL server ``pg_server`` (``host:port``; the server's own CPU is not counted)."""
    with tempfile.TemporaryDirectory() as tmp, _staging_url(tmp, pg_server) as url:
        cfg = parse_config(
            {
                "erp": {"dsn": "postgresql://unused"},
                "capture": {"mode": "logical", "tables": ["public.bench"], "batch_size": batch},
                "staging": {"url": url},
            }
        )
        store = StagingStore(url)
        store.setup()
        store.ensure_mirror(SCHEMA)
        src = LogicalSource(cfg, store)
        src._handle_frame(memoryview(data[0]))  # the Relation, before the table is known
        src._schemas[SCHEMA.qualified] = SCHEMA
        handle = src._handle_frame
        if profile is not None:
            profile.enable()
        t0 = time.process_time()
        for f in data[1:]:
            handle(memoryview(f))
        src._commit_batch()
        spent = time.process_time() - t0
        if profile is not None:
            profile.disable()
        store.dispose()
    return spent


@contextlib.contextmanager
def _staging_url(tmp: str, pg_server: str | None) -> Iterator[str]:
    if pg_server is None:
        yield f"sqlite:///{Path(tmp) / 's.db'}"
        return
    name = f"bench_capture_path_{os.getpid()}"
    admin = f"postgresql://postgres@{pg_server}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@{pg_server}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=5000, help="capture.batch_size")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    ap.add_argument(
        "--postgresql",
        metavar="HOST:PORT",
        help="PostgreSQL staging on this server (trust auth, user postgres) instead of SQLite",
    )
    args = ap.parse_args()
    data = frames(args.changes)
    n = len([f for f in data if f[25:26] in (b"I", b"U", b"D")])
    if args.profile:
        prof = cProfile.Profile()
        run(data, args.batch, prof, args.postgresql)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    best = min(run(data, args.batch, None, args.postgresql) for _ in range(args.repeat))
    staging = "PostgreSQL" if args.postgresql else "SQLite"
    print(
        f"{n:,} changes (decoder {pgoutput.DECODER}), {staging} staging, batch {args.batch}: "
        f"{best / n * 1e6:.2f} us CPU per change (best of {args.repeat})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
