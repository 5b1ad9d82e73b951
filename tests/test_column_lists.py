"""Column lists and row filters per table (PostgreSQL 15 publications): personal data stays out of
staging, rows outside the filter never reach it, the snapshot honours both, writers going on; a
changed list or filter re-copies the table; a filter PostgreSQL would enforce by refusing the
ERP's own updates is refused before the publication is touched."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from replicator.cdc.triggers import TriggerSource
from replicator.cdc.triggers.dialects import dialect_for
from replicator.cli import main
from replicator.config import load_config
from replicator.errors import ConfigError, FatalError, SchemaError
from replicator.staging import StagingStore
from tests.capture_worker import Erp, make_config, new_mysql_db, new_sqlite_db
from tests.helpers import (
    ROOT,
    DaemonProcess,
    assert_staging_equals_source,
    wait_until,
    write_config,
)

T = "public.customers"


def _config(tmp: Path, erp: str, staging: str, columns: list[str], cond: str) -> Path:
    return write_config(
        tmp / "config.toml",
        {
            "erp": {"dsn": erp},
            "capture": {
                "mode": "logical",
                "tables": [T],
                "batch_ms": 50,
                "batch_size": 300,
                "heartbeat_interval": 1,
                "status_interval": 1,
                "columns": {T: columns},
                "filters": {T: cond},
            },
            "staging": {"url": staging},
            "health": {"listen": "127.0.0.1:0"},
            "daemon": {"state_dir": str(tmp / "state")},
            "logging": {"format": "json"},
        },
    )


def _writer(url: str, stop: threading.Event, count: list[int]) -> None:
    rnd = random.Random(3)
    with psycopg.connect(url, autocommit=True) as c:
        while not stop.is_set():
            k = rnd.randint(1, 2500)
            r = rnd.random()
            if r < 0.5:
                c.execute(
                    "UPDATE customers SET name = name || '+', secret = md5(random()::text) "
                    "WHERE id = %s",
                    (k,),
                )
            elif r < 0.7:
                c.execute("DELETE FROM customers WHERE id = %s", (k,))
            else:
                c.execute(
                    "INSERT INTO customers VALUES (%s, %s, %s, 'x', 'north') ON CONFLICT DO NOTHING",
                    (k, f"new-{k}", f"{k}@example.com"),
                )
            count[0] += 1
            # A steady load, not a flood: capture must keep up for the test to mean anything.
            stop.wait(0.002)


def _mirror_columns(staging_url: str) -> list[str]:
    store = StagingStore(staging_url)
    try:
        store.setup()
        info = store.mirror(T)
        assert info is not None
        with store.engine.connect() as conn:
            return list(conn.exec_driver_sql(f"SELECT * FROM {store.q(info.name)}").keys())
    finally:
        store.dispose()


def test_column_list_and_row_filter_then_changed(
    erp_db: str, staging_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, secret text, "
            "region text)"
        )
        c.execute(
            "INSERT INTO customers SELECT g, 'c' || g, g || '@example.com', md5(g::text), "
            "'south' FROM generate_series(1, 2000) g"
        )
    cfg = _config(tmp_path, erp_db, staging_url, ["id", "name", "region"], "id % 2 = 0")
    stop = threading.Event()
    count = [0]
    writer = threading.Thread(target=_writer, args=(erp_db, stop, count))
    d = DaemonProcess(cfg).start()
    try:
        wait_until(lambda: "streaming_started" in d.output(), 60, what="streaming")
        writer.start()
        wait_until(lambda: count[0] > 300, 60, what="writes")
        stop.set()
        writer.join()
        assert _mirror_columns(staging_url) == ["id", "name", "region"]
        assert_staging_equals_source(erp_db, staging_url, [T], 120, where={T: "id % 2 = 0"})
        assert d.terminate() == 0

        # Another column list and filter: the table is copied again in its new shape.
        cfg = _config(tmp_path, erp_db, staging_url, ["id", "name", "email"], "id % 3 = 0")
        d = DaemonProcess(cfg, log=tmp_path / "second.log").start()
        stop.clear()
        writer = threading.Thread(target=_writer, args=(erp_db, stop, count))
        writer.start()
        wait_until(lambda: "snapshot_table_done" in d.output(), 120, what="the re-copy")
        stop.set()
        writer.join()
        assert _mirror_columns(staging_url) == ["id", "name", "email"]
        assert_staging_equals_source(erp_db, staging_url, [T], 120, where={T: "id % 3 = 0"})
        assert d.terminate() == 0
    finally:
        stop.set()
        d.kill9()


def test_a_filter_outside_the_replica_identity_is_refused_before_it_can_break_the_erp(
    erp_db: str, tmp_path: Path
) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE customers (id int PRIMARY KEY, name text, region text)")
        c.execute("INSERT INTO customers VALUES (1, 'a', 'north')")
    cfg = _config(
        tmp_path, erp_db, f"sqlite:///{tmp_path / 's.db'}", ["id", "name"], "region = 'north'"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sync_daemon.py"), "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "capture.filters.public.customers reads region" in out
    assert "Traceback" not in out
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("UPDATE customers SET name = 'b' WHERE id = 1")  # the ERP still works
        assert c.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)


# ------------------------------------------------------------------------------- trigger mode
TRIGGER_FILTER = "region <> 'south' AND id % 5 <> 0"
TRIGGER_FILTER_2 = "region IN ('north', 'o''ne\\il') OR id < 40"


def _trigger_erp(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Erp]:
    if kind == "postgresql":
        yield Erp("postgresql", request.getfixturevalue("erp_db"))
        return
    if kind == "mysql":
        erp = new_mysql_db(request.getfixturevalue("mariadb_url"))
        try:
            yield erp
        finally:
            erp.drop()
        return
    yield new_sqlite_db(tmp_path / "erp.db")


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def trigger_erp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Erp]:
    yield from _trigger_erp(request.param, request, tmp_path)


def _trigger_config(erp: Erp, tmp_path: Path, cond: str) -> Path:
    return write_config(
        tmp_path / "triggers.toml",
        {
            "erp": {"dsn": erp.url},
            "capture": {
                "mode": "triggers",
                "tables": ["customers"],
                "poll_interval": 0.01,
                "batch_size": 200,
                "columns": {"customers": ["id", "name", "region"]},
                "filters": {"customers": cond},
            },
            "staging": {"url": f"sqlite:///{tmp_path / 'staging.db'}"},
            "daemon": {"state_dir": str(tmp_path)},
        },
    )


_NEW_IDS = itertools.count(1000)


def _trigger_writer(erp: Erp, stop: threading.Event, count: list[int]) -> None:
    """Rows move into and out of the filter, keys change, the secret column changes."""
    rnd = random.Random(5)
    regions = ["north", "south", "east", "o'ne\\il"]
    with erp.session() as conn:
        while not stop.is_set() or count[0] < 400:
            k = rnd.randint(1, 700)
            r = rnd.random()
            region = rnd.choice(regions).replace("'", "''")
            if erp.dialect == "mysql":
                region = region.replace("\\", "\\\\")
            erp.begin(conn)
            if r < 0.4:
                erp.run(
                    conn,
                    f"UPDATE customers SET region = '{region}', secret = 'SECRET-{k}-{count[0]}' "
                    f"WHERE id = {k}",
                )
            elif r < 0.55:
                erp.run(conn, f"UPDATE customers SET name = 'n{count[0]}' WHERE id = {k}")
            elif r < 0.65:
                # a key change, into or out of `id % 5 <> 0`
                erp.run(
                    conn,
                    f"UPDATE customers SET id = {next(_NEW_IDS)} WHERE id = {k} AND id < 1000",
                )
            elif r < 0.8:
                erp.run(conn, f"DELETE FROM customers WHERE id = {k}")
            else:
                erp.run(
                    conn,
                    erp.upsert(
                        "customers",
                        "id, name, secret, region",
                        f"{k}, 'new{k}', 'SECRET-new-{k}', '{region}'",
                        "name = 'again'",
                    ),
                )
            erp.commit(conn)
            count[0] += 1
            time.sleep(0.001)


def _filtered_source(erp: Erp, cond: str) -> list[tuple[Any, ...]]:
    if erp.dialect == "mysql":
        cond = cond.replace("\\", "\\\\")
    return erp.query(f"SELECT id, name, region FROM customers WHERE {cond} ORDER BY id")


def _stream_while_writing(src: TriggerSource, erp: Erp) -> None:
    stop, count = threading.Event(), [0]
    failed: list[BaseException] = []

    def write() -> None:
        try:
            _trigger_writer(erp, stop, count)
        except BaseException as exc:
            failed.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        halt = threading.Event()
        while count[0] < 400 and writer.is_alive():
            src.run_cycle(0.05, halt)
    finally:
        stop.set()
        writer.join()
    assert not failed, failed
    for _ in range(5):
        src.run_cycle(0.05, threading.Event())


def test_trigger_column_list_and_row_filter(
    trigger_erp: Erp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The triggers log only listed columns and only what the filter publishes (an update out of
    the filter is a delete, into it an insert); the copy honours both; a changed filter makes the
    triggers outdated, and after `triggers install` the table is copied again."""
    erp = trigger_erp
    erp.execute(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(40), secret VARCHAR(40), "
        "region VARCHAR(20))"
    )
    erp.execute(
        *(
            f"INSERT INTO customers VALUES ({i}, 'c{i}', 'SECRET-{i}', "
            f"'{['north', 'south', 'east'][i % 3]}')"
            for i in range(1, 601)
        )
    )
    cfg_path = _trigger_config(erp, tmp_path, TRIGGER_FILTER)
    assert main(["triggers", "install", "--config", str(cfg_path)]) == 0
    cfg = load_config(cfg_path)
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    try:
        info = store.mirror("public.customers")
        assert info is not None and [c.name for c in info.schema.columns] == [
            "id",
            "name",
            "region",
        ]
        assert store.rows("public.customers") == _filtered_source(erp, TRIGGER_FILTER)
        _stream_while_writing(src, erp)
        assert store.rows("public.customers") == _filtered_source(erp, TRIGGER_FILTER)
    finally:
        src.close()

    # Another filter: the installed triggers are outdated until installed again.
    cfg_path = _trigger_config(erp, tmp_path, TRIGGER_FILTER_2)
    capsys.readouterr()
    assert main(["triggers", "status", "--config", str(cfg_path)]) == 1
    assert "outdated" in capsys.readouterr().out
    cfg = load_config(cfg_path)
    stale = TriggerSource(cfg, StagingStore(cfg.staging_url))
    with pytest.raises(FatalError, match="triggers install"):
        stale.start()
    stale.close()
    assert main(["triggers", "install", "--config", str(cfg_path)]) == 0
    # Changes between the install and the start are not lost.
    erp.execute(
        "UPDATE customers SET region = 'north' WHERE id IN (41, 42, 43)",
        "UPDATE customers SET region = 'south', name = 'between' WHERE id IN (44, 45, 46)",
        "DELETE FROM customers WHERE id = 47",
    )
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    try:
        # The changed filter re-copies the table online, a chunk per batch.
        assert [c.table for c in src.copies] == ["public.customers"]
        while src.copies:
            src.run_cycle(0.05, threading.Event())
        assert store.rows("public.customers") == _filtered_source(erp, TRIGGER_FILTER_2)
        _stream_while_writing(src, erp)
        assert store.rows("public.customers") == _filtered_source(erp, TRIGGER_FILTER_2)
    finally:
        src.close()
        store.dispose()
    # The personal-data column never reached staging, in no table.
    assert b"SECRET" not in (tmp_path / "staging.db").read_bytes()


def test_trigger_filter_or_list_that_cannot_work_is_refused(tmp_path: Path) -> None:
    erp = new_sqlite_db(tmp_path / "erp.db")
    erp.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, region TEXT)")
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = make_config(erp.url, staging, ["customers"], filters={"customers": "lower(region) = 'x'"})
    with pytest.raises(ConfigError, match=r"capture\.filters\.public\.customers .*lower\(region\)"):
        dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)
    cfg = make_config(erp.url, staging, ["customers"], columns={"customers": ["name", "region"]})
    d = dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)
    with (
        d.connection("test") as conn,
        pytest.raises(SchemaError, match=r"capture\.columns\.public\.customers .* key column 'id'"),
    ):
        d.install(conn, ["public.customers"])
    # A filter on a column the table has not: refused before a trigger could fail ERP writes.
    cfg = make_config(erp.url, staging, ["customers"], filters={"customers": "regio = 'x'"})
    d = dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)
    with d.connection("test") as conn:
        with pytest.raises(SchemaError, match=r"capture\.filters\.public\.customers reads 'regio'"):
            d.install(conn, ["public.customers"])
        [st] = d.status(conn, ["public.customers"])
        assert st.state == "error" and "regio" in st.detail
