"""Trigger capture specifics: install/status/uninstall, value decoding, replica role, the copy
boundary, cleanup, the NOTIFY doorbell and the MariaDB cascade warning (real servers)."""

from __future__ import annotations

import datetime as dt
import decimal
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from replicator.cdc.triggers import TriggerSource
from replicator.cdc.triggers.dialects import VERSION, dialect_for
from replicator.cli import main
from replicator.errors import FatalError
from replicator.staging import StagingStore
from tests.capture_worker import (
    Erp,
    erp_of,
    install_triggers,
    make_config,
    new_mysql_db,
    new_sqlite_db,
)


def _write_config(tmp_path: Path, erp_url: str, tables: list[str], **capture: Any) -> str:
    extra = "".join(
        f"{k} = {v!r}\n".replace("True", "true").replace("False", "false")
        for k, v in capture.items()
    )
    path = tmp_path / "config.toml"
    path.write_text(
        f'[erp]\ndsn = "{erp_url}"\n\n[capture]\nmode = "triggers"\n'
        f"tables = {tables!r}\n{extra}\n"
        f'[staging]\nurl = "sqlite:///{tmp_path / "staging.db"}"\n'
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
    )
    return str(path)


def _drain(src: TriggerSource) -> None:
    stop = threading.Event()
    for _ in range(3):
        src.run_cycle(0.02, stop)


@pytest.fixture
def pg_erp(erp_db: str) -> Erp:
    return Erp("postgresql", erp_db)


@pytest.fixture
def my_erp(mariadb_url: str) -> Iterator[Erp]:
    erp = new_mysql_db(mariadb_url)
    try:
        yield erp
    finally:
        erp.drop()


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def any_erp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Erp]:
    yield from erp_of(request.param, request, tmp_path)


# ------------------------------------------------------------------------------- install / CLI
def test_cli_install_status_uninstall(
    any_erp: Erp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    any_erp.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(20))")
    any_erp.execute(
        "CREATE TABLE order_lines (order_no INTEGER, line_no INTEGER, qty INTEGER, "
        "PRIMARY KEY (order_no, line_no))"
    )
    cfg = _write_config(tmp_path, any_erp.url, ["items", "order_lines"])
    assert main(["triggers", "status", "--config", cfg]) == 1
    assert "missing" in capsys.readouterr().out
    assert main(["triggers", "install", "--config", cfg]) == 0
    assert main(["triggers", "install", "--config", cfg]) == 0  # idempotent
    capsys.readouterr()
    assert main(["triggers", "status", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert out.count("current") == 2 and f"version {VERSION}" in out

    # A table that changes shape makes MariaDB/SQLite triggers (column lists) outdated;
    # PostgreSQL's to_jsonb(NEW) follows added columns and stays current.
    any_erp.execute("ALTER TABLE items ADD COLUMN note VARCHAR(10)")
    code = main(["triggers", "status", "--config", cfg, "--json"])
    out = capsys.readouterr().out
    if any_erp.dialect == "postgresql":
        assert code == 0
    else:
        assert code == 1 and '"outdated"' in out
        assert main(["triggers", "install", "--config", cfg]) == 0
        assert main(["triggers", "status", "--config", cfg]) == 0

    # a table leaving capture.tables: install removes its triggers
    cfg_one = _write_config(tmp_path, any_erp.url, ["items"])
    assert main(["triggers", "install", "--config", cfg_one]) == 0
    capsys.readouterr()
    assert main(["triggers", "status", "--config", cfg_one]) == 0
    dialect = dialect_for(
        any_erp.url, make_config(any_erp.url, "sqlite://", ["items"]).capture, any_erp.dialect
    )
    with any_erp.session() as conn:
        assert dialect.present_triggers(conn, "public.order_lines") == {}
    cfg = _write_config(tmp_path, any_erp.url, ["items", "order_lines"])
    assert main(["triggers", "install", "--config", cfg]) == 0

    assert main(["triggers", "uninstall", "--config", cfg]) == 2  # needs --yes
    assert main(["triggers", "uninstall", "--config", cfg, "--yes"]) == 0
    capsys.readouterr()
    assert main(["triggers", "status", "--config", cfg]) == 1
    assert capsys.readouterr().out.count("missing") == 2
    # reversible: the changelog and meta tables are gone, writes work without triggers
    any_erp.execute("INSERT INTO items (id, name) VALUES (1, 'x')")
    with pytest.raises(Exception):  # noqa: B017 - the driver's "no such table" error
        any_erp.query("SELECT count(*) FROM sync_changelog")


def test_pg_status_detects_old_version_and_disabled_trigger(
    pg_erp: Erp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pg_erp.execute("CREATE TABLE items (id int PRIMARY KEY)")
    cfg = _write_config(tmp_path, pg_erp.url, ["items"])
    assert main(["triggers", "install", "--config", cfg]) == 0
    pg_erp.execute("UPDATE sync_changelog_meta SET version = 0")
    capsys.readouterr()
    assert main(["triggers", "status", "--config", cfg]) == 1
    assert "version 0" in capsys.readouterr().out
    assert main(["triggers", "install", "--config", cfg]) == 0
    pg_erp.execute("ALTER TABLE items ENABLE TRIGGER sync_changelog_row")  # not ALWAYS any more
    capsys.readouterr()
    assert main(["triggers", "status", "--config", cfg]) == 1
    assert "ENABLE ALWAYS" in capsys.readouterr().out


def test_start_without_triggers_is_fatal(any_erp: Erp, tmp_path: Path) -> None:
    any_erp.execute("CREATE TABLE items (id INTEGER PRIMARY KEY)")
    cfg = make_config(any_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    src = TriggerSource(cfg, StagingStore(cfg.staging_url))
    with pytest.raises(FatalError, match="sync-daemon triggers install"):
        src.start()
    src.close()


# ------------------------------------------------------------------------------------ values
PG_TYPES = """CREATE TABLE typed (
    id bigint PRIMARY KEY, n numeric(14,4), i int, s smallint, f float8, r real, b boolean,
    d date, ts timestamp, tz timestamptz, t time, u uuid, j jsonb, js json, by bytea,
    tx text, arr int[], iv interval, big numeric)"""


def test_pg_values_decode_like_the_source(erp_db: str, staging_url: str) -> None:
    with psycopg.connect(erp_db, autocommit=True) as conn:
        conn.execute(PG_TYPES)
        conn.execute(
            "INSERT INTO typed VALUES (1, 12345.6789, 7, 3, 1.5, 0.25, true, '2024-02-29', "
            "'2024-02-29 12:34:56.789', '2024-02-29 12:34:56.789+02', '23:59:59.5', "
            '\'6f1c7a3e-6d7e-4d8c-9a57-0c6f7b1b2a11\', \'{"a": [1, 2.5, null], "b": "x"}\', '
            "'{\"k\": 1}', '\\x00ff10', 'tab\tquote''s ünïcode', '{1,2,3}', '1 day', "
            "123456789012345678901234567890.123456789)"
        )
    cfg = install_triggers(erp_db, staging_url, ["typed"])
    store = StagingStore(staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    with psycopg.connect(erp_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO typed (id, n, tz, by, b, j) SELECT 2, n, tz, by, false, j "
            "FROM typed WHERE id = 1"
        )
        conn.execute("UPDATE typed SET n = -0.0001, ts = NULL, by = '\\x' WHERE id = 1")
        conn.execute("INSERT INTO typed (id) VALUES (3)")
    _drain(src)
    src.close()
    with psycopg.connect(erp_db) as conn:
        cols = [c.name for c in store.mirror("public.typed").schema.columns]  # type: ignore[union-attr]
        source = conn.execute(f"SELECT {', '.join(cols)} FROM typed ORDER BY id").fetchall()
    staged = store.rows("public.typed")
    assert len(staged) == 3
    if store.dialect == "postgresql":
        for got, want in zip(staged, source, strict=True):
            for c, g, w in zip(cols, got, want, strict=True):
                if c == "iv":
                    continue  # interval arrives as PostgreSQL's text form
                assert g == w and type(g) is type(w), (c, g, w)
    else:  # SQLite staging: values as staging stores them (checked via the row of id 2)
        row = dict(zip(cols, staged[1], strict=True))
        assert row["n"] == "12345.6789" and row["by"] == b"\x00\xff\x10" and row["b"] == 0
        assert dt.datetime.fromisoformat(row["tz"]) == dt.datetime(
            2024, 2, 29, 10, 34, 56, 789000, tzinfo=dt.UTC
        )
    store.dispose()


def test_pg_decoder_types(erp_db: str, tmp_path: Path) -> None:
    """Typed values handed to staging, before any storage conversion."""
    from replicator.cdc.triggers.decode import RowDecoder, loads

    with psycopg.connect(erp_db, autocommit=True) as conn:
        conn.execute(PG_TYPES)
        text = conn.execute(
            "SELECT to_jsonb(t)::text FROM (SELECT 1::bigint AS id, 1.50::numeric(14,4) AS n, "
            "'2024-01-01 10:00+00'::timestamptz AS tz, '\\x01'::bytea AS by, true AS b, "
            "'6f1c7a3e-6d7e-4d8c-9a57-0c6f7b1b2a11'::uuid AS u, '2024-01-01'::date AS d, "
            "'[1, {\"x\": 2}]'::jsonb AS j) t"
        ).fetchone()[0]  # type: ignore[index]
    cfg = make_config(erp_db, f"sqlite:///{tmp_path / 's.db'}", ["typed"])
    d = dialect_for(cfg.erp.url, cfg.capture, "postgresql")
    conn2 = d.connect("test")
    schema = d.table_schema(conn2, "public.typed")
    conn2.close()
    v = RowDecoder(schema).decode(loads(text))
    assert v["n"] == decimal.Decimal("1.5000") and isinstance(v["n"], decimal.Decimal)
    assert v["tz"] == dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC) and v["tz"].tzinfo is not None
    assert v["by"] == b"\x01" and v["b"] is True and v["d"] == dt.date(2024, 1, 1)
    assert v["u"] == uuid.UUID("6f1c7a3e-6d7e-4d8c-9a57-0c6f7b1b2a11")
    assert v["j"] == [1, {"x": 2}] and isinstance(v["id"], int)


def test_mariadb_values(my_erp: Erp, tmp_path: Path) -> None:
    my_erp.execute(
        "CREATE TABLE t (id INT PRIMARY KEY, amount DECIMAL(12,2), ts TIMESTAMP(3) NULL, "
        "dtm DATETIME(6), d DATE, bl BLOB, flag TINYINT(1), big BIGINT UNSIGNED, name VARCHAR(20))"
    )
    cfg = install_triggers(my_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["t"])
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    my_erp.execute(
        "INSERT INTO t VALUES (1, 10.05, '2024-03-01 10:00:00.250', '2024-03-01 11:22:33.123456', "
        "'2024-03-01', x'00ff', 1, 18446744073709551615, 'ä''b')"
    )
    _drain(src)
    row = dict(
        zip(
            [c.name for c in store.mirror("public.t").schema.columns],  # type: ignore[union-attr]
            store.rows("public.t")[0],
            strict=True,
        )
    )
    assert row["amount"] == "10.05" and row["bl"] == b"\x00\xff" and row["name"] == "ä'b"
    assert row["ts"] == "2024-03-01 10:00:00.250000+00:00"  # session time zone independent
    assert row["dtm"] == "2024-03-01 11:22:33.123456" and row["d"] == "2024-03-01"
    assert row["big"] == "18446744073709551615"
    src.close()
    store.dispose()


# ---------------------------------------------------------------------- PostgreSQL behaviour
def test_pg_replica_role_and_truncate_are_captured(pg_erp: Erp, tmp_path: Path) -> None:
    pg_erp.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    cfg = install_triggers(pg_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    pg_erp.execute(
        "SET session_replication_role = replica",
        "INSERT INTO items VALUES (1, 'bulk'), (2, 'load')",
    )
    _drain(src)
    assert store.rows("public.items") == [(1, "bulk"), (2, "load")]
    pg_erp.execute("TRUNCATE items", "INSERT INTO items VALUES (3, 'after')")
    _drain(src)
    assert store.rows("public.items") == [(3, "after")]
    src.close()


def test_pg_copy_boundary_no_gap_no_overlap(pg_erp: Erp, tmp_path: Path) -> None:
    """A transaction open during the initial copy arrives through the changelog, exactly once."""
    pg_erp.execute("CREATE TABLE items (id int PRIMARY KEY, v int)")
    cfg = install_triggers(pg_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    pg_erp.execute("INSERT INTO items VALUES (1, 1), (2, 2)")
    with pg_erp.session() as open_txn:
        pg_erp.run(open_txn, "UPDATE items SET v = v + 100 WHERE id = 1")
        pg_erp.run(open_txn, "INSERT INTO items VALUES (3, 3)")
        store = StagingStore(cfg.staging_url)
        src = TriggerSource(cfg, store)
        src.start()  # copy runs while the transaction above is open
        assert store.rows("public.items") == [(1, 1), (2, 2)]
        pg_erp.execute("UPDATE items SET v = v + 10 WHERE id = 2")  # commits after the copy
        pg_erp.commit(open_txn)
    _drain(src)
    assert store.rows("public.items") == [(1, 101), (2, 12), (3, 3)]
    # copy: the mirror reset (T) and 2 rows; stream: 3 changes — none twice
    assert store.replication_status()[0]["changes_applied"] == 1 + 2 + 3
    src.close()


def test_pg_cleanup_only_after_staging_commit(pg_erp: Erp, tmp_path: Path) -> None:
    pg_erp.execute("CREATE TABLE items (id int PRIMARY KEY, v int)")
    cfg = install_triggers(pg_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"], cleanup_batch=7)
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    pg_erp.execute("INSERT INTO items SELECT g, g FROM generate_series(1, 50) g")
    with pg_erp.session() as open_txn:  # uncommitted rows must survive cleanup
        pg_erp.run(open_txn, "UPDATE items SET v = 0 WHERE id = 1")
        _drain(src)
        # every committed entry is applied and deleted; the open one is kept (applied below)
        assert pg_erp.query("SELECT count(*) FROM sync_changelog") == [(0,)]
        pg_erp.commit(open_txn)
    _drain(src)
    assert pg_erp.query("SELECT count(*) FROM sync_changelog") == [(0,)]
    assert store.rows("public.items")[0] == (1, 0)
    src.heartbeat()
    assert store.replication_status()[0]["lag_seconds"] == 0.0
    src.close()


def test_pg_notify_doorbell_wakes_the_reader(pg_erp: Erp, tmp_path: Path) -> None:
    pg_erp.execute("CREATE TABLE items (id int PRIMARY KEY)")
    cfg = install_triggers(
        pg_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"], poll_interval=30.0
    )
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    threading.Timer(0.3, lambda: pg_erp.execute("INSERT INTO items VALUES (1)")).start()
    t0 = time.monotonic()
    n = src.run_cycle(10.0, threading.Event())
    assert n == 1 and time.monotonic() - t0 < 2.0  # woken by NOTIFY, not the 30 s poll
    src.close()


def test_pg_added_column_widens_the_mirror(pg_erp: Erp, tmp_path: Path) -> None:
    pg_erp.execute("CREATE TABLE items (id int PRIMARY KEY, v int)")
    cfg = install_triggers(pg_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    pg_erp.execute("ALTER TABLE items ADD COLUMN note text", "INSERT INTO items VALUES (1, 2, 'x')")
    _drain(src)
    assert store.rows("public.items") == [(1, 2, "x")]
    src.close()


def test_pg_renamed_and_dropped_columns_are_followed(pg_erp: Erp, tmp_path: Path) -> None:
    """to_jsonb(NEW) follows the table; the mirror follows the images: a renamed column keeps
    its values (matched by attnum), a dropped one is dropped, in order with the rows."""
    pg_erp.execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int)",
        "INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 5) g",
    )
    cfg = install_triggers(pg_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    _drain(src)
    pg_erp.execute(
        "UPDATE items SET qty = 100 WHERE id = 1",
        "ALTER TABLE items RENAME COLUMN name TO title",
        "UPDATE items SET title = 'renamed' WHERE id = 2",
        "ALTER TABLE items DROP COLUMN qty",
        "INSERT INTO items VALUES (6, 'six')",
    )
    _drain(src)
    info = store.mirror("public.items")
    assert info is not None and [c.name for c in info.schema.columns] == ["id", "title"]
    assert store.rows("public.items") == [
        (1, "n1"),
        (2, "renamed"),
        (3, "n3"),
        (4, "n4"),
        (5, "n5"),
        (6, "six"),
    ]
    with store.engine.connect() as conn:
        ops = [
            r[0] for r in conn.exec_driver_sql("SELECT op FROM sync_journal WHERE row_key IS NULL")
        ]
    assert "S" in ops
    src.close()


# ------------------------------------------------------------------------------------ MariaDB
def test_mariadb_cascade_children_are_named_at_start(my_erp: Erp, tmp_path: Path) -> None:
    my_erp.execute("CREATE TABLE orders (id INT PRIMARY KEY) ENGINE=InnoDB")
    my_erp.execute(
        "CREATE TABLE order_lines (id INT PRIMARY KEY, order_id INT, "
        "FOREIGN KEY (order_id) REFERENCES orders(id) ON DELETE CASCADE) ENGINE=InnoDB"
    )
    cfg = install_triggers(my_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["orders", "order_lines"])
    src = TriggerSource(cfg, StagingStore(cfg.staging_url))
    with structlog.testing.capture_logs() as logs:
        src.start()
    src.close()
    warn = [e for e in logs if e["event"] == "cascade_changes_not_captured"]
    assert warn and "public.order_lines" in warn[0]["tables"][0]


def test_mariadb_crash_between_commit_and_delete_applies_once(my_erp: Erp, tmp_path: Path) -> None:
    """The checkpoint's id set is deleted again on restart; nothing is applied twice."""
    my_erp.execute("CREATE TABLE items (id INT PRIMARY KEY, v INT)")
    cfg = install_triggers(my_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    src.reader.cleanup = lambda: 0  # type: ignore[method-assign]  # "crash" before the delete
    my_erp.execute("INSERT INTO items VALUES (1, 1), (2, 2)")
    assert src.run_cycle(0.5, threading.Event()) == 2
    src.close()
    assert my_erp.query("SELECT count(*) FROM sync_changelog") == [(2,)]
    before = store.replication_status()[0]["changes_applied"]
    src2 = TriggerSource(cfg, store)
    src2.start()
    my_erp.execute("UPDATE items SET v = 5 WHERE id = 2")
    _drain(src2)
    assert store.rows("public.items") == [(1, 1), (2, 5)]
    assert store.replication_status()[0]["changes_applied"] == before + 1
    assert my_erp.query("SELECT count(*) FROM sync_changelog") == [(0,)]
    src2.close()


# ------------------------------------------------------------------------------------- SQLite
def test_sqlite_cursor_and_cleanup(tmp_path: Path) -> None:
    erp = new_sqlite_db(tmp_path / "erp.db")
    erp.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT, amount NUMERIC(10,2), "
        "at DATETIME, raw BLOB)"
    )
    cfg = install_triggers(erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"], cleanup_batch=3)
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    erp.execute(
        "INSERT INTO items VALUES (1, 'a', 1.5, '2024-01-01 10:00:00', x'0102')",
        "INSERT INTO items VALUES (2, 'b', 2, NULL, NULL)",
    )
    erp.execute("UPDATE items SET id = 9 WHERE id = 2")
    _drain(src)
    assert store.rows("public.items") == [
        (1, "a", "1.5", "2024-01-01 10:00:00", b"\x01\x02"),
        (9, "b", "2", None, None),
    ]
    assert erp.query("SELECT count(*) FROM sync_changelog") == [(0,)]
    # AUTOINCREMENT: ids freed by cleanup are never reused, the cursor stays valid
    erp.execute("INSERT INTO items (id, v) VALUES (3, 'c')")
    assert erp.query("SELECT min(id) FROM sync_changelog")[0][0] > 3
    _drain(src)
    assert [r[0] for r in store.rows("public.items")] == [1, 3, 9]
    src.close()


def test_table_added_to_config_gets_copied(tmp_path: Path) -> None:
    erp = new_sqlite_db(tmp_path / "erp.db")
    erp.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)",
        "CREATE TABLE other (id INTEGER PRIMARY KEY, w TEXT)",
        "INSERT INTO items VALUES (1, 'a')",
        "INSERT INTO other VALUES (5, 'x')",
    )
    cfg = install_triggers(erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    src.close()
    erp.execute("INSERT INTO items VALUES (2, 'b')")  # pending while the daemon is down
    cfg2 = install_triggers(erp.url, cfg.staging_url, ["items", "other"])
    src2 = TriggerSource(cfg2, store)
    src2.start()
    _drain(src2)
    assert store.rows("public.items") == [(1, "a"), (2, "b")]
    assert store.rows("public.other") == [(5, "x")]
    src2.close()


def test_one_reader_per_changelog(any_erp: Erp, tmp_path: Path) -> None:
    """A second reader would delete changelog entries the first has not applied."""
    from replicator.errors import DaemonAlreadyRunning

    any_erp.execute("CREATE TABLE items (id INTEGER PRIMARY KEY)")
    cfg = install_triggers(any_erp.url, f"sqlite:///{tmp_path / 's.db'}", ["items"])
    first = TriggerSource(cfg, StagingStore(cfg.staging_url))
    first.start()
    second = TriggerSource(cfg, StagingStore(f"sqlite:///{tmp_path / 'other.db'}"))
    with pytest.raises(DaemonAlreadyRunning):
        second.start()
    second.close()
    first.close()
    third = TriggerSource(cfg, StagingStore(cfg.staging_url))
    third.start()  # the lock went with the first reader
    third.close()


def test_table_added_and_another_removed_while_writers_go_on(any_erp: Erp, tmp_path: Path) -> None:
    """Trigger mode's reload path (a config edit restarts capture): `triggers install` for the
    new table set while the old reader goes on, then the new reader starts. The added table is
    copied and equal to the source; the removed one is no longer applied, its mirror kept."""
    erp = any_erp
    erp.execute(
        "CREATE TABLE a (id INTEGER PRIMARY KEY, v INTEGER)",
        "CREATE TABLE b (id INTEGER PRIMARY KEY, v INTEGER)",
        "CREATE TABLE items (id INTEGER PRIMARY KEY, v INTEGER)",
        *(f"INSERT INTO {t} VALUES ({i}, 0)" for t in ("a", "b", "items") for i in range(1, 201)),
    )
    stop, count = threading.Event(), [0]
    failed: list[BaseException] = []

    def write() -> None:
        rnd = random.Random(7)
        try:
            with erp.session() as conn:
                while not stop.is_set():
                    t, k = rnd.choice(["a", "b", "items"]), rnd.randint(1, 300)
                    erp.begin(conn)
                    if rnd.random() < 0.2:
                        erp.run(conn, f"DELETE FROM {t} WHERE id = {k}")
                    else:
                        erp.run(conn, erp.upsert(t, "id, v", f"{k}, 1", f"v = {t}.v + 1"))
                    erp.commit(conn)
                    count[0] += 1
                    time.sleep(0.001)
        except BaseException as exc:
            failed.append(exc)

    def cycles(src: TriggerSource, writes: int) -> None:
        target = count[0] + writes
        while count[0] < target and writer.is_alive():
            src.run_cycle(0.02, threading.Event())

    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = install_triggers(erp.url, staging, ["a", "b"])
    store = StagingStore(staging)
    src = TriggerSource(cfg, store)
    src.start()
    writer = threading.Thread(target=write)
    writer.start()
    try:
        cycles(src, 150)
        cfg2 = install_triggers(erp.url, staging, ["a", "items"])  # b's triggers go, items' come
        cycles(src, 150)  # the old reader meanwhile: items' entries are not its business
        src.close()
        src = TriggerSource(cfg2, store)
        src.start()
        cycles(src, 300)
    finally:
        stop.set()
        writer.join()
    assert not failed, failed
    erp.execute("UPDATE b SET v = -1")
    _drain(src)
    src.close()
    for t in ("a", "items"):
        assert store.rows(f"public.{t}") == erp.query(f"SELECT id, v FROM {t} ORDER BY id"), t
    kept = store.rows("public.b")
    assert len(kept) > 100 and all(v != -1 for _, v in kept)
    assert erp.query("SELECT count(*) FROM b")[0][0] > 100
