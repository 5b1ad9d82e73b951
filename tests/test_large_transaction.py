"""Large source transactions: one of 1,000,000 rows replicates without the daemon's memory growing
with it (flushed in chunks), and a kill -9 while its chunks are spilled (SQLite staging) ends, after
a restart, with staging equal to the source."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import psutil
import psycopg

from tests.helpers import DaemonProcess, assert_staging_equals_source, base_config, wait_until

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


def _spilled_rows(db: Path) -> int:
    """Rows parked in spill tables of SQLite staging right now (0 when there are none)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as s:
            names = [
                n
                for (n,) in s.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name LIKE '\\_sync\\_spill\\_\\_%' ESCAPE '\\'"
                )
            ]
            return sum(s.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names)
    except sqlite3.Error:
        return 0


def test_kill9_while_a_large_transaction_is_spilled(erp_db: str, tmp_path: Path) -> None:
    """The crash window of the spill: chunks of an uncommitted source transaction are on disk in
    staging, nothing of it is confirmed to the slot. After kill -9 and a restart the transaction
    is streamed again and staging ends equal to the source, with no spill left behind."""
    db = tmp_path / "s.db"
    staging_url = f"sqlite:///{db}"
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE big (id bigint PRIMARY KEY, sku text, qty int)")
        c.execute("INSERT INTO big SELECT g, 'OLD-' || g, 1 FROM generate_series(1, 20000) g")
    cfg = base_config(tmp_path, erp_db, staging_url, ["public.big"], batch_size=1000)
    d = DaemonProcess(cfg).start()
    try:
        wait_until(lambda: "streaming_started" in d.output(), 60, what="streaming")
        with psycopg.connect(erp_db) as c:  # updates, deletes and inserts in one transaction
            c.execute("UPDATE big SET sku = 'NEW-' || id, qty = qty + 1 WHERE id % 3 = 0")
            c.execute("DELETE FROM big WHERE id % 7 = 0")
            c.execute(
                "INSERT INTO big SELECT g, 'INS-' || g, 2 FROM generate_series(20001, 300000) g"
            )
            c.commit()
        wait_until(lambda: _spilled_rows(db) > 0, 120, interval=0.05, what="spilled chunks")
        d.kill9()
        assert _spilled_rows(db) > 0, "the kill must land while chunks are spilled"
        d = DaemonProcess(cfg).start()
        assert_staging_equals_source(erp_db, staging_url, ["public.big"], timeout=300)
        assert _spilled_rows(db) == 0
        assert d.terminate() == 0
    finally:
        d.kill9()
