"""Benchmark: one large source transaction applied into SQLite staging, in one run, two ways.

  direct  — every chunk flushed into one open staging transaction (how sync-daemon worked up
            to 0.1: the reference);
  spilled — chunks parked in spill tables in short transactions of their own, moved into the
            mirror with the commit (how it works now).

Both apply the same rows (``big (id bigint primary key, sku text, qty int, price numeric)``, the
shape of ``tests/test_large_transaction.py``) through :class:`replicator.staging.ApplyTxn` with
the journal on, while another thread writes to the staging store every 100 ms as the log store
and service state do. Printed side by side: total time and rate, how long the commit held
SQLite's write lock, the longest wait of the other writer, and the largest WAL seen. Nothing is
asserted.

Usage: python bench/large_transaction.py [--rows 1000000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import decimal
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicator.changes import Change, Checkpoint, Column, TableSchema  # noqa: E402
from replicator.staging import StagingStore  # noqa: E402

SCHEMA = TableSchema(
    "public",
    "big",
    (
        Column("id", "bigint", 20),
        Column("sku", "text", 25),
        Column("qty", "integer", 23),
        Column("price", "numeric(12,2)", 1700),
    ),
    ("id",),
)


def run(mode: str, rows: int, batch: int, workdir: Path) -> dict[str, Any]:
    path = workdir / f"{mode}.db"
    store = StagingStore(f"sqlite:///{path}")
    store.setup()
    store.start_checkpointer()
    store.ensure_mirror(SCHEMA)
    stop = threading.Event()
    waits: list[float] = []
    wal_peak = [0]

    def other_writer() -> None:
        conn = sqlite3.connect(path, timeout=120, isolation_level=None)
        while not stop.is_set():
            t = time.monotonic()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE sync_tables SET updated_at = updated_at")
            conn.execute("COMMIT")
            waits.append(time.monotonic() - t)
            wal = path.with_name(path.name + "-wal")
            if wal.exists():
                wal_peak[0] = max(wal_peak[0], wal.stat().st_size)
            stop.wait(0.1)
        conn.close()

    writer = threading.Thread(target=other_writer)
    writer.start()
    started = time.monotonic()
    txn = store.begin("bench", spill=True)
    if mode == "direct":
        _ = txn.conn  # open the staging transaction now: every flush goes into it
    for i in range(1, rows + 1):
        price = decimal.Decimal(i) / 100
        txn.apply(
            Change("public.big", "I", {"id": i, "sku": f"SKU-{i}", "qty": i % 100, "price": price})
        )
        if txn.pending_count >= batch:
            txn.flush()
    commit_started = time.monotonic()
    txn.commit(Checkpoint("bench", "0/1"))
    done = time.monotonic()
    stop.set()
    writer.join()
    store.dispose()
    with sqlite3.connect(path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM big").fetchone()
    assert count == rows, (mode, count)
    return {
        "seconds": done - started,
        "rate": rows / (done - started),
        "commit_seconds": done - commit_started,
        "other_writer_max_wait": max(waits) if waits else float("nan"),
        "other_writer_commits": len(waits),
        "wal_peak_mb": wal_peak[0] / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sync-bench-") as d:
        results = {m: run(m, args.rows, args.batch, Path(d)) for m in ("direct", "spilled")}
    print(
        f"one transaction of {args.rows:,} inserts, SQLite staging, batch {args.batch}, journal on"
    )
    print(f"{'':34}{'direct (reference)':>20}{'spilled (now)':>16}")
    rows_fmt = [
        ("total seconds", "seconds", "{:.1f}"),
        ("changes/s", "rate", "{:,.0f}"),
        ("write lock held by the commit, s", "commit_seconds", "{:.2f}"),
        ("other writer: longest wait, s", "other_writer_max_wait", "{:.2f}"),
        ("other writer: commits meanwhile", "other_writer_commits", "{:d}"),
        ("largest staging WAL, MB", "wal_peak_mb", "{:.0f}"),
    ]
    for label, key, fmt in rows_fmt:
        d, s = results["direct"][key], results["spilled"][key]
        print(f"{label:34}{fmt.format(d):>20}{fmt.format(s):>16}")
    print(f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
