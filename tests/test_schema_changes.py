"""A DBA changes an ERP table while capture streams and writers keep changing its rows: renamed,
dropped, retyped and added columns, and a changed primary key. Staging ends equal to the source
(the mirror's columns are the source's, with the source's values), and the journal says what
happened. Also a column renamed while the daemon was stopped."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import psycopg

from replicator.staging import StagingStore
from tests.helpers import DaemonProcess, assert_staging_equals_source, base_config, wait_until

TABLE = ["public.t"]


def _setup(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            "CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL UNIQUE, name text, qty int, "
            "price numeric(12,2), n int NOT NULL DEFAULT 0)"
        )
        c.execute(
            "INSERT INTO t SELECT g, 'C' || g, 'name-' || g, g % 7, g * 1.25, 0 "
            "FROM generate_series(1, 3000) g"
        )


def _writer(url: str, stop: threading.Event, seed: int, count: list[int]) -> None:
    """Writes through columns no DDL here touches (id, code, n), all over the key range."""
    rnd = random.Random(seed)
    with psycopg.connect(url, autocommit=True) as c:
        while not stop.is_set():
            k = rnd.randint(1, 3500)
            r = rnd.random()
            try:
                if r < 0.6:
                    c.execute("UPDATE t SET n = n + 1 WHERE id = %s", (k,))
                elif r < 0.75:
                    c.execute("DELETE FROM t WHERE id = %s", (k,))
                else:
                    c.execute(
                        "INSERT INTO t (id, code, n) VALUES (%s, %s, 1) ON CONFLICT DO NOTHING",
                        (k, f"C{k}"),
                    )
            except psycopg.errors.Error:
                continue  # a statement that met the DDL's lock timeout: the next one goes on
            count[0] += 1
            # A steady load, not a flood: capture must keep up for the test to mean anything.
            stop.wait(0.002)


def _journal_ops(staging_url: str) -> list[str]:
    store = StagingStore(staging_url)
    try:
        with store.engine.connect() as conn:
            return [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT op FROM sync_journal WHERE table_name = 'public.t' AND row_key IS NULL"
                )
            ]
    finally:
        store.dispose()


def _columns(staging_url: str) -> list[str]:
    store = StagingStore(staging_url)
    try:
        store.setup()
        info = store.mirror("public.t")
        assert info is not None
        with store.engine.connect() as conn:
            res = conn.exec_driver_sql(f"SELECT * FROM {store.q(info.name)} LIMIT 1")
            return list(res.keys())
    finally:
        store.dispose()


def _copied(staging_url: str) -> bool:
    store = StagingStore(staging_url)
    try:
        cp = store.load_checkpoint("erp")
        return cp is not None and not cp.extra.get("copying")
    finally:
        store.dispose()


def test_columns_renamed_dropped_retyped_added_and_key_changed_while_streaming(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    _setup(erp_db)
    cfg = base_config(tmp_path, erp_db, staging_url, TABLE, batch_size=500)
    stop = threading.Event()
    count = [0]
    writers = [threading.Thread(target=_writer, args=(erp_db, stop, s, count)) for s in range(2)]
    d = DaemonProcess(cfg).start()
    try:
        assert_staging_equals_source(erp_db, staging_url, TABLE, 120)
        for w in writers:
            w.start()
        with psycopg.connect(erp_db, autocommit=True) as c:
            c.execute("ALTER TABLE t RENAME COLUMN name TO title")
            wait_until(lambda: count[0] > 50, 30, what="writes after the rename")
            c.execute("ALTER TABLE t DROP COLUMN qty")
            c.execute("ALTER TABLE t ADD COLUMN extra text DEFAULT 'x'")
            wait_until(lambda: count[0] > 150, 30, what="writes after drop and add")
            c.execute("ALTER TABLE t ALTER COLUMN price TYPE numeric(12,3)")
            wait_until(lambda: count[0] > 250, 30, what="writes after the type change")
        wait_until(lambda: _copied(staging_url), 180, 0.5, "the re-copy after the type change")
        with psycopg.connect(erp_db, autocommit=True) as c:
            c.execute("ALTER TABLE t DROP CONSTRAINT t_pkey")
            c.execute("ALTER TABLE t ADD PRIMARY KEY (code)")
        count_at_key_change = count[0]
        wait_until(lambda: count[0] > count_at_key_change + 100, 30, what="writes after the key")
        stop.set()
        for w in writers:
            w.join()
        with psycopg.connect(erp_db, autocommit=True) as c:  # one more change after the key
            c.execute("UPDATE t SET n = -5 WHERE code = 'C17'")
        wait_until(lambda: _copied(staging_url), 180, 0.5, "the re-copy with the new key")
        assert_staging_equals_source(erp_db, staging_url, TABLE, 120)
        cols = _columns(staging_url)
        assert "title" in cols and "name" not in cols and "qty" not in cols and "extra" in cols
        assert _journal_ops(staging_url).count("S") >= 3
        assert "mirror_schema_changed" in d.output()
        assert d.terminate() == 0
    finally:
        stop.set()
        d.kill9()


def test_column_renamed_while_the_daemon_was_stopped_keeps_its_values(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    _setup(erp_db)
    cfg = base_config(tmp_path, erp_db, staging_url, TABLE, batch_size=500)
    d = DaemonProcess(cfg).start()
    try:
        assert_staging_equals_source(erp_db, staging_url, TABLE, 120)
        assert d.terminate() == 0
        with psycopg.connect(erp_db, autocommit=True) as c:
            c.execute("UPDATE t SET name = 'before-' || id WHERE id <= 10")
            c.execute("ALTER TABLE t RENAME COLUMN name TO title")
            c.execute("UPDATE t SET title = 'after-' || id WHERE id > 2990")
        d = DaemonProcess(cfg, log=tmp_path / "second.log").start()
        # The stream replays the updates before the rename, then follows the rename in order.
        wait_until(lambda: "title" in _columns(staging_url), 60, what="the rename in staging")
        assert "name" not in _columns(staging_url)
        assert_staging_equals_source(erp_db, staging_url, TABLE, 120)
        assert d.terminate() == 0
    finally:
        d.kill9()
