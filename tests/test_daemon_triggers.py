"""The daemon process in trigger mode: `sync-daemon triggers install`, then `run`, on a PostgreSQL
ERP without logical replication and on an embedded SQLite ERP."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.helpers import DaemonProcess, assert_staging_equals_source, base_config, wait_until


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "sync_daemon.py", *args], capture_output=True, text=True)


def test_postgresql_erp_in_trigger_mode(erp_db: str, tmp_path: Path) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int, price numeric(10,2))")
        c.execute("INSERT INTO stock SELECT 'S' || g, g, g * 1.25 FROM generate_series(1, 500) g")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = base_config(
        tmp_path, erp_db, staging, ["public.stock"], mode="triggers", poll_interval=0.05
    )
    missing = _cli("run", "--config", str(cfg))
    assert missing.returncode == 3 and "triggers install" in missing.stdout + missing.stderr
    res = _cli("triggers", "install", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    status = _cli("triggers", "status", "--config", str(cfg))
    assert status.returncode == 0 and "current" in status.stdout
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp_db, staging, ["public.stock"], timeout=60)
        with psycopg.connect(erp_db, autocommit=True) as c:
            c.execute("UPDATE stock SET qty = qty * 2 WHERE qty % 3 = 0")
            c.execute("DELETE FROM stock WHERE qty > 450")
            c.execute("INSERT INTO stock VALUES ('NEW', 1, 9.99)")
        assert_staging_equals_source(erp_db, staging, ["public.stock"], timeout=60)
        assert d.terminate() == 0


def test_sqlite_erp_in_trigger_mode(tmp_path: Path) -> None:
    erp = tmp_path / "erp.db"
    with sqlite3.connect(erp) as c:
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER)")
        c.executemany(
            "INSERT INTO items VALUES (?, ?, ?)", [(i, f"n{i}", i) for i in range(1, 101)]
        )
    staging = tmp_path / "s.db"
    cfg = base_config(
        tmp_path,
        f"sqlite:///{erp}",
        f"sqlite:///{staging}",
        ["main.items"],
        mode="triggers",
        poll_interval=0.05,
    )
    assert _cli("triggers", "install", "--config", str(cfg)).returncode == 0

    def mirror() -> list[tuple[int, str, int]]:
        try:
            with sqlite3.connect(staging) as s:
                return s.execute("SELECT id, name, qty FROM main__items ORDER BY id").fetchall()
        except sqlite3.Error:
            return []

    def source() -> list[tuple[int, str, int]]:
        with sqlite3.connect(erp) as s:
            return s.execute("SELECT id, name, qty FROM items ORDER BY id").fetchall()

    with DaemonProcess(cfg) as d:
        wait_until(lambda: mirror() == source(), 60, what="snapshot")
        with sqlite3.connect(erp) as c:
            c.execute("UPDATE items SET qty = qty + 100 WHERE id <= 10")
            c.execute("DELETE FROM items WHERE id > 90")
            c.execute("INSERT INTO items VALUES (1000, 'x', 0)")
        wait_until(lambda: mirror() == source(), 60, what="changes")
        assert len(mirror()) == 91
        assert d.terminate() == 0
