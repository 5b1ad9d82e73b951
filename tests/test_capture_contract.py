"""The capture contract, run against every capture mode: staging ends equal to the source.

One body per case (initial snapshot; inserts, updates, key changes and deletes; truncate;
concurrent writers; clean restart without re-applying; kill -9 mid-stream and restart) and a
parametrized ``capture_mode`` fixture. Each mode is a factory in :data:`MODES` that prepares an
ERP database and returns a :class:`Harness`; ``harness.start()`` returns a started source for
(erp_url, staging_url, tables).

The ``logical`` mode runs the same bodies through logical replication (pgoutput) on the
throwaway cluster, which runs with wal_level=logical; it installs no triggers.
"""

from __future__ import annotations

import decimal
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from replicator.cdc.base import CaptureSource
from replicator.cdc.triggers.dialects import dialect_for
from replicator.staging import StagingStore
from tests.capture_worker import Erp, build_source, make_config, new_mysql_db, new_sqlite_db

TABLE = "public.items"
WORKER = Path(__file__).with_name("capture_worker.py")
DDL = (
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(100), qty INTEGER, "
    "price NUMERIC(12,2))"
)


@dataclass
class Harness:
    """One capture mode against one ERP database and one staging store."""

    mode: str
    erp: Erp
    staging_url: str
    worker_mode: str = "triggers"
    install: bool = True
    sources: list[CaptureSource] = field(default_factory=list)
    stores: list[StagingStore] = field(default_factory=list)

    def prepare(self, tables: list[str]) -> None:
        """Install what the mode needs in the ERP (triggers) once the tables exist."""
        if self.install:
            cfg = make_config(self.erp.url, self.staging_url, tables)
            d = dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)
            conn = d.connect("test-install")
            try:
                d.install(conn, tables)
            finally:
                conn.close()

    def start(self, tables: list[str] | None = None) -> tuple[CaptureSource, StagingStore]:
        tables = tables or [TABLE]
        store = StagingStore(self.staging_url)
        cfg = make_config(self.erp.url, self.staging_url, tables)
        src = build_source(self.worker_mode, cfg, store, threading.Event())
        src.start()
        self.sources.append(src)
        self.stores.append(store)
        return src, store

    def close(self) -> None:
        for s in self.sources:
            s.close()
        for st in self.stores:
            st.dispose()


def _pg_mode(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Erp, Callable[[], None]]:
    pg = request.getfixturevalue("pg_server")
    name = pg.createdb("erp")
    return Erp("postgresql", pg.url(name)), lambda: pg.dropdb(name)


def _mysql_mode(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Erp, Callable[[], None]]:
    erp = new_mysql_db(request.getfixturevalue("mariadb_url"))
    return erp, erp.drop


def _sqlite_mode(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Erp, Callable[[], None]]:
    return new_sqlite_db(tmp_path / "erp.db"), lambda: None


MODES: dict[str, Callable[[pytest.FixtureRequest, Path], tuple[Erp, Callable[[], None]]]] = {
    "triggers-postgresql": _pg_mode,
    "triggers-mysql": _mysql_mode,
    "triggers-sqlite": _sqlite_mode,
    "logical": _pg_mode,  # the same throwaway cluster runs with wal_level=logical
}


@pytest.fixture(params=list(MODES))
def capture_mode(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    erp, drop = MODES[request.param](request, tmp_path)
    h = Harness(request.param, erp, f"sqlite:///{tmp_path / 'staging.db'}")
    if request.param == "logical":
        h.worker_mode, h.install = "logical", False
    try:
        yield h
    finally:
        h.close()
        drop()


# ------------------------------------------------------------------------------------- helpers
def norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """(id, name, qty, price) with the price as a Decimal, whatever store it came from."""
    return [
        (
            int(r[0]),
            r[1],
            None if r[2] is None else int(r[2]),
            None if r[3] is None else decimal.Decimal(str(r[3])),
        )
        for r in rows
    ]


def source_rows(erp: Erp) -> list[tuple[Any, ...]]:
    return norm(erp.query("SELECT id, name, qty, price FROM items ORDER BY id"))


def staging_rows(staging_url: str) -> list[tuple[Any, ...]]:
    store = StagingStore(staging_url)
    try:
        return norm(store.rows(TABLE))
    finally:
        store.dispose()


def drain(src: CaptureSource, rounds: int = 3) -> None:
    """Run cycles until a few in a row find nothing."""
    idle = 0
    stop = threading.Event()
    deadline = time.monotonic() + 30
    while idle < rounds and time.monotonic() < deadline:
        idle = idle + 1 if src.run_cycle(0.05, stop) == 0 else 0


def setup_items(h: Harness, n: int = 20) -> None:
    h.erp.execute(DDL)
    if n:
        values = ", ".join(f"({i}, 'item {i}', {i * 3}, {i}.25)" for i in range(1, n + 1))
        h.erp.execute(f"INSERT INTO items (id, name, qty, price) VALUES {values}")
    h.prepare([TABLE])


def random_txn(erp: Erp, conn: Any, rng: random.Random, *, keys: int = 60) -> None:
    """One transaction of 1-4 random writes; conflicts and deadlocks are rolled back."""
    try:
        erp.begin(conn)
        for _ in range(rng.randint(1, 4)):
            k = rng.randint(1, keys)
            op = rng.random()
            if op < 0.45:
                erp.run(
                    conn,
                    f"UPDATE items SET qty = {rng.randint(0, 999)}, "
                    f"price = {rng.randint(0, 99999)}.{rng.randint(0, 99):02d} WHERE id = {k}",
                )
            elif op < 0.75:
                erp.run(
                    conn,
                    erp.upsert(
                        "items",
                        "id, name, qty, price",
                        f"{k}, 'n{rng.randint(0, 9)}', {rng.randint(0, 9)}, 1.10",
                        f"name = 'u{rng.randint(0, 9)}'",
                    ),
                )
            elif op < 0.9:
                erp.run(conn, f"DELETE FROM items WHERE id = {k}")
            else:
                erp.run(conn, f"UPDATE items SET id = {keys + rng.randint(1, 20)} WHERE id = {k}")
        erp.commit(conn)
    except Exception:
        erp.rollback(conn)


class Writers:
    """``n`` threads writing random transactions until stopped."""

    def __init__(self, erp: Erp, n: int, *, seed: int = 1, pause: float = 0.0) -> None:
        self.erp = erp
        self.stop = threading.Event()
        self.commits = 0
        self.threads = [
            threading.Thread(target=self._run, args=(random.Random(seed + i), pause), daemon=True)
            for i in range(n)
        ]

    def _run(self, rng: random.Random, pause: float) -> None:
        with self.erp.session() as conn:
            while not self.stop.is_set():
                random_txn(self.erp, conn, rng)
                self.commits += 1
                if pause:
                    time.sleep(rng.random() * pause)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


# --------------------------------------------------------------------------------------- cases
def test_snapshot(capture_mode: Harness) -> None:
    setup_items(capture_mode, 200)
    capture_mode.start()
    assert staging_rows(capture_mode.staging_url) == source_rows(capture_mode.erp)


def test_inserts_updates_deletes(capture_mode: Harness) -> None:
    h = capture_mode
    setup_items(h, 5)
    src, _ = h.start()
    h.erp.execute(
        "INSERT INTO items (id, name, qty, price) VALUES (100, 'new', 1, 9.99)",
        "UPDATE items SET qty = qty + 1, name = 'changed' WHERE id <= 3",
        "DELETE FROM items WHERE id = 4",
        "UPDATE items SET id = 200 WHERE id = 5",  # key change
        "UPDATE items SET price = NULL, name = NULL WHERE id = 1",
    )
    h.erp.execute("INSERT INTO items (id, name, qty, price) VALUES (4, 'again', 2, 0.01)")
    h.erp.execute("DELETE FROM items WHERE id = 100")
    drain(src)
    assert staging_rows(h.staging_url) == source_rows(h.erp)
    assert [r[0] for r in staging_rows(h.staging_url)] == [1, 2, 3, 4, 200]


def test_truncate(capture_mode: Harness) -> None:
    h = capture_mode
    if h.erp.dialect == "mysql":
        pytest.skip("MariaDB fires no trigger on TRUNCATE (documented; DELETE is captured)")
    setup_items(h, 10)
    src, _ = h.start()
    if h.erp.dialect == "sqlite":
        h.erp.execute("DELETE FROM items")  # SQLite has no TRUNCATE
    else:
        h.erp.execute("TRUNCATE items")
    h.erp.execute("INSERT INTO items (id, name, qty, price) VALUES (7, 'after', 1, 1.00)")
    drain(src)
    assert (
        staging_rows(h.staging_url) == source_rows(h.erp) == [(7, "after", 1, decimal.Decimal("1"))]
    )


def test_concurrent_writers(capture_mode: Harness) -> None:
    h = capture_mode
    setup_items(h, 60)
    src, _ = h.start()
    stop = threading.Event()
    with Writers(h.erp, 4, seed=7, pause=0.002) as w:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            src.run_cycle(0.01, stop)
    drain(src)
    assert w.commits > 50
    assert staging_rows(h.staging_url) == source_rows(h.erp)


def test_restart_resumes_without_reapplying(capture_mode: Harness) -> None:
    h = capture_mode
    setup_items(h, 10)
    src, store = h.start()
    h.erp.execute("UPDATE items SET qty = 0 WHERE id < 5")
    drain(src)
    src.close()
    before = store.replication_status()[0]["changes_applied"]
    h.erp.execute("DELETE FROM items WHERE id = 9")
    src2, store2 = h.start()
    drain(src2)
    after = store2.replication_status()[0]["changes_applied"]
    assert after == before + 1  # only the one new change, nothing applied twice, no new copy
    assert staging_rows(h.staging_url) == source_rows(h.erp)


def _spawn(h: Harness) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, str(WORKER), h.worker_mode, h.erp.url, h.staging_url, TABLE],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert p.stdout is not None
    for line in p.stdout:  # log lines (structlog writes to stdout) until "started"
        if line.strip() == "started":
            threading.Thread(target=p.stdout.read, daemon=True).start()  # keep the pipe drained
            return p
    raise AssertionError("capture worker did not start")


def test_kill_9_and_restart(capture_mode: Harness) -> None:
    h = capture_mode
    setup_items(h, 60)
    worker = _spawn(h)
    try:
        with Writers(h.erp, 3, seed=11, pause=0.002) as w:
            time.sleep(0.8)
            worker.kill()  # SIGKILL mid-stream: staging transaction and changelog cleanup cut off
            worker.wait(10)
            time.sleep(0.3)
            worker = _spawn(h)
            time.sleep(0.8)
        assert w.commits > 30
        expected = source_rows(h.erp)
        deadline = time.monotonic() + 30
        while staging_rows(h.staging_url) != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert staging_rows(h.staging_url) == expected
    finally:
        worker.terminate()
        worker.wait(10)
