"""Bounded memory: one source transaction of 1,000,000 rows replicates without the daemon's memory
growing with it (the transaction is flushed in chunks into one staging transaction)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import psycopg

from tests.helpers import DaemonProcess, base_config, wait_until

ROWS = 1_000_000


def test_million_row_transaction_memory_bounded(erp_db: str, tmp_path: Path) -> None:
    staging_url = f"sqlite:///{tmp_path / 's.db'}"
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute(
            "CREATE TABLE big (id bigint PRIMARY KEY, sku text, qty int, price numeric(12,2))"
        )
    cfg = base_config(tmp_path, erp_db, staging_url, ["public.big"], batch_size=5000)
    peak = [0]
    with DaemonProcess(cfg) as d:
        proc = psutil.Process(d.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        wait_until(lambda: "streaming_started" in d.output(), 30, what="streaming")
        time.sleep(1)
        baseline = proc.memory_info().rss
        with psycopg.connect(erp_db) as c:
            c.execute(
                f"INSERT INTO big SELECT g, 'SKU-' || g, g % 100, g * 0.01 "
                f"FROM generate_series(1, {ROWS}) g"
            )
            c.commit()

        import sqlite3

        def done() -> bool:
            try:
                with sqlite3.connect(tmp_path / "s.db") as s:
                    return s.execute("SELECT count(*) FROM big").fetchone()[0] == ROWS
            except sqlite3.Error:
                return False

        wait_until(done, 420, interval=1, what="1M rows in staging")
        stop.set()
        sampler.join()
        d.terminate()
    growth = peak[0] - baseline
    print(
        f"baseline RSS {baseline / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB, "
        f"growth {growth / 2**20:.0f} MiB"
    )
    # A million rows of this shape are ~100 MB as Python objects; bounded apply must stay far below.
    assert growth < 60 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert peak[0] < 300 * 2**20
