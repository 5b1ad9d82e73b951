"""Ordering under concurrency: 8 writers on a few hot rows, random delays inside transactions,
a reader polling every few milliseconds; staging must equal the source after every run.

With hot rows, transactions commit in an order unrelated to the order of their changelog ids
across rows, and a reader that advanced by id (``id > last_id``) or by ``xid < xmin`` would lose
or misorder changes. See :mod:`replicator.cdc.triggers.source` for why the readers are correct.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.cdc.triggers import TriggerSource
from replicator.cdc.triggers.dialects import dialect_for
from replicator.staging import StagingStore
from tests.capture_worker import Erp, make_config, new_mysql_db

HOT_KEYS = 4
WRITERS = 8
RUNS = 3
SECONDS = 1.2
MAX_SECONDS = 60.0  # a run that has not reached its minimum work by then fails


def _writer(erp: Erp, who: int, stop: threading.Event, counts: list[int], base: int) -> None:
    rng = random.Random(who * 7919)
    with erp.session() as conn:
        if erp.dialect == "postgresql":  # detect lock cycles fast (default 1 s)
            erp.run(conn, "SET deadlock_timeout = '20ms'")
            erp.commit(conn)
        while not stop.is_set():
            try:
                erp.begin(conn)
                n = counts[who] + 1
                # An append-only row drawn first, committed late: lost if a reader skips by id.
                erp.run(conn, f"INSERT INTO ev (id, who) VALUES ({base + who * 10**6 + n}, {who})")
                for _ in range(rng.randint(1, 3)):
                    k = rng.randint(1, HOT_KEYS)
                    r = rng.random()
                    v = rng.randint(0, 10**6)
                    if r < 0.6:
                        erp.run(conn, f"UPDATE hot SET val = {v}, who = {who} WHERE id = {k}")
                    elif r < 0.8:
                        erp.run(
                            conn,
                            erp.upsert(
                                "hot", "id, val, who", f"{k}, {v}, {who}", f"val = {v}, who = {who}"
                            ),
                        )
                    else:
                        erp.run(conn, f"DELETE FROM hot WHERE id = {k}")
                    time.sleep(rng.random() * 0.004)  # hold the row locks a while
                time.sleep(rng.random() * 0.002)
                erp.commit(conn)
                counts[who] += 1
            except Exception:
                erp.rollback(conn)  # deadlock or serialization failure: try again


def _run(erp: Erp, staging_url: str, runs: int = RUNS, seconds: float = SECONDS) -> None:
    erp.execute("CREATE TABLE hot (id INTEGER PRIMARY KEY, val INTEGER, who INTEGER)")
    erp.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, who INTEGER)")
    erp.execute(
        "INSERT INTO hot (id, val, who) VALUES "
        + ", ".join(f"({k}, 0, -1)" for k in range(1, HOT_KEYS + 1))
    )
    cfg = make_config(erp.url, staging_url, ["hot", "ev"], poll_interval=0.003)
    d = dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)
    conn = d.connect("test-install")
    d.install(conn, ["public.hot", "public.ev"])
    conn.close()
    for run in range(runs):
        store = StagingStore(staging_url)
        src = TriggerSource(cfg, store, name=f"erp-{run}")  # a fresh copy per run
        src.start()
        stop, reader_stop = threading.Event(), threading.Event()
        counts = [0] * WRITERS
        threads = [
            threading.Thread(target=_writer, args=(erp, w, stop, counts, run * 10**7))
            for w in range(WRITERS)
        ]
        cycles = 0

        def reader(src: TriggerSource = src, reader_stop: threading.Event = reader_stop) -> None:
            nonlocal cycles
            while not reader_stop.is_set():
                src.run_cycle(0.003, reader_stop)
                cycles += 1

        rt = threading.Thread(target=reader)
        rt.start()
        for t in threads:
            t.start()
        # Run for at least ``seconds`` and until enough commits and reader cycles happened to
        # make the run meaningful: on a busy server (another workload on the same MariaDB) the
        # writers commit more slowly, and a fixed window would make the run prove nothing.
        started = time.monotonic()
        while time.monotonic() - started < max(seconds, MAX_SECONDS):
            if time.monotonic() - started >= seconds and sum(counts) > 50 and cycles > 10:
                break
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(30)
        reader_stop.set()
        rt.join(30)
        for _ in range(3):
            src.run_cycle(0.01, threading.Event())
        expected = sorted(erp.query("SELECT id, val, who FROM hot"))
        got = sorted((int(a), int(b), int(c)) for a, b, c in store.rows("public.hot"))
        ev_expected = sorted(erp.query("SELECT id, who FROM ev"))
        ev_got = sorted((int(a), int(b)) for a, b in store.rows("public.ev"))
        src.close()
        store.reset_source(f"erp-{run}", ["public.hot", "public.ev"])
        store.dispose()
        assert sum(counts) > 50 and cycles > 10, (counts, cycles)
        assert ev_got == ev_expected, f"run {run}: committed changes were lost"
        assert got == expected, f"run {run}: staging differs from the source"


def test_ordering_postgresql(pg_server: object, tmp_path: Path) -> None:
    name = pg_server.createdb("erp")  # type: ignore[attr-defined]
    try:
        _run(Erp("postgresql", pg_server.url(name)), f"sqlite:///{tmp_path / 's.db'}")  # type: ignore[attr-defined]
    finally:
        pg_server.dropdb(name)  # type: ignore[attr-defined]


@pytest.fixture
def mysql_erp(mariadb_url: str) -> Iterator[Erp]:
    erp = new_mysql_db(mariadb_url)
    try:
        yield erp
    finally:
        erp.drop()


def test_ordering_mariadb(mysql_erp: Erp, tmp_path: Path) -> None:
    _run(mysql_erp, f"sqlite:///{tmp_path / 's.db'}")


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_ordering_long(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """10 runs of 2 s each per dialect (deselect with ``-m "not slow"``)."""
    if dialect == "postgresql":
        pg = request.getfixturevalue("pg_server")
        name = pg.createdb("erp")
        try:
            _run(Erp("postgresql", pg.url(name)), f"sqlite:///{tmp_path / 's.db'}", 10, 2.0)
        finally:
            pg.dropdb(name)
    else:
        erp = new_mysql_db(request.getfixturevalue("mariadb_url"))
        try:
            _run(erp, f"sqlite:///{tmp_path / 's.db'}", 10, 2.0)
        finally:
            erp.drop()
