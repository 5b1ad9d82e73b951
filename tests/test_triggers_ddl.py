"""DDL on captured columns in trigger mode: the ERP's own writes go on, capture says why it
cannot follow, and `triggers install` (with the config following the rename) brings staging back
to the source (real PostgreSQL and MariaDB)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import structlog

from replicator.cdc.triggers import TriggerSource
from replicator.cli import main
from replicator.config import load_config
from replicator.errors import FatalError, SchemaError
from replicator.staging import StagingStore
from tests.capture_worker import Erp, new_mysql_db
from tests.helpers import write_config

T = "public.customers"
COLUMNS = ["id", "name", "region", "qty"]  # `secret` stays out of staging
FILTER = "qty > 0"


def _config(erp: Erp, tmp: Path, columns: list[str], cond: str, **extra: Any) -> Path:
    return write_config(
        tmp / "triggers.toml",
        {
            "erp": {"dsn": erp.url},
            "capture": {
                "mode": "triggers",
                "tables": ["customers"],
                "poll_interval": 0.01,
                "batch_size": 50,
                "columns": {"customers": columns},
                "filters": {"customers": cond},
                "heartbeat_interval": 0.01,
                **extra,
            },
            "staging": {"url": f"sqlite:///{tmp / 'staging.db'}"},
            "daemon": {"state_dir": str(tmp)},
        },
    )


def _drain(src: TriggerSource) -> None:
    for _ in range(4):
        src.run_cycle(0.05, threading.Event())
    while src.copies:
        src.run_cycle(0.05, threading.Event())


def _source(erp: Erp, columns: list[str], cond: str) -> list[tuple[Any, ...]]:
    return erp.query(f"SELECT {', '.join(columns)} FROM customers WHERE {cond} ORDER BY 1")


def _staging(store: StagingStore, columns: list[str]) -> list[tuple[Any, ...]]:
    info = store.mirror(T)
    assert info is not None
    assert [c.name for c in info.schema.columns] == columns
    return store.rows(T)


def _status(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["triggers", "status", "--config", str(cfg_path)])
    return rc, capsys.readouterr().out


@pytest.fixture
def pg_erp(erp_db: str) -> Erp:
    erp = Erp("postgresql", erp_db)
    erp.execute(
        "CREATE TABLE customers (id integer PRIMARY KEY, name text, region text, "
        "secret text, qty integer)",
        "INSERT INTO customers SELECT i, 'c' || i, CASE i % 3 WHEN 0 THEN 'north' ELSE 'south' "
        "END, 'SECRET-' || i, i % 4 FROM generate_series(1, 120) AS i",
    )
    return erp


# (DDL, the ERP's writes after it, the config's columns and filter after it, whether the
# running reader stops, naming the column, at the first change it reads)
CASES = {
    "key renamed": (
        "ALTER TABLE customers RENAME COLUMN id TO cid",
        [
            "INSERT INTO customers (cid, name, region, qty) VALUES (500, 'new', 'x', 3)",
            "UPDATE customers SET qty = qty + 1 WHERE cid BETWEEN 10 AND 30",
            "UPDATE customers SET cid = cid + 1000 WHERE cid IN (41, 42)",
            "DELETE FROM customers WHERE cid IN (5, 6, 7)",
        ],
        ["cid", "name", "region", "qty"],
        FILTER,
        "'id'",
    ),
    "filtered column renamed": (
        "ALTER TABLE customers RENAME COLUMN qty TO quantity",
        [
            "INSERT INTO customers (id, name, region, quantity) VALUES (500, 'new', 'x', 3)",
            "UPDATE customers SET quantity = quantity + 1 WHERE id BETWEEN 10 AND 30",
            "UPDATE customers SET id = id + 1000 WHERE id IN (41, 42)",
            "DELETE FROM customers WHERE id IN (5, 6, 7)",
        ],
        ["id", "name", "region", "quantity"],
        "quantity > 0",
        None,  # nothing passes the filter any more: no entry to stop at (see docs)
    ),
    "listed column renamed": (
        "ALTER TABLE customers RENAME COLUMN name TO full_name",
        [
            "INSERT INTO customers (id, full_name, region, qty) VALUES (500, 'new', 'x', 3)",
            "UPDATE customers SET qty = qty + 1, full_name = 'u' WHERE id BETWEEN 10 AND 30",
            "UPDATE customers SET id = id + 1000 WHERE id IN (41, 42)",
            "DELETE FROM customers WHERE id IN (5, 6, 7)",
        ],
        ["id", "full_name", "region", "qty"],
        FILTER,
        "'name'",
    ),
    "listed column dropped": (
        "ALTER TABLE customers DROP COLUMN region",
        [
            "INSERT INTO customers (id, name, qty) VALUES (500, 'new', 3)",
            "UPDATE customers SET qty = qty + 1 WHERE id BETWEEN 10 AND 30",
            "UPDATE customers SET id = id + 1000 WHERE id IN (41, 42)",
            "DELETE FROM customers WHERE id IN (5, 6, 7)",
        ],
        ["id", "name", "qty"],
        FILTER,
        "'region'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pg_ddl_on_captured_columns_never_fails_the_erp(
    pg_erp: Erp, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    ddl, writes, columns, cond, stop_names = CASES[case]
    erp = pg_erp
    old_cfg = _config(erp, tmp_path, COLUMNS, FILTER)
    assert main(["triggers", "install", "--config", str(old_cfg)]) == 0
    cfg = load_config(old_cfg)
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    try:
        _drain(src)
        assert _staging(store, COLUMNS) == _source(erp, COLUMNS, FILTER)

        erp.execute(ddl)
        # The ERP's own writes succeed with the (now outdated) triggers in place.
        erp.execute(*writes)
        key = columns[0]
        assert erp.query(f"SELECT {key} FROM customers WHERE {key} = 500") == [(500,)]
        assert erp.query(f"SELECT count(*) FROM customers WHERE {key} IN (5, 6, 7, 41, 42)") == [
            (0,)
        ]
        assert erp.query(f"SELECT count(*) FROM customers WHERE {key} IN (1041, 1042)") == [(2,)]

        if case == "key renamed":
            # A delete without its key column is logged with no key, never {"id": null} (which
            # would delete nothing in staging, silently).
            assert erp.query(
                "SELECT count(*), count(old_key) FROM sync_changelog WHERE op = 'D'"
            ) == [(3, 0)]
        # Our side says so: status names the column, and so does the reader.
        rc, out = _status(old_cfg, capsys)
        old_name = (set(COLUMNS) - set(columns)).pop()
        assert rc == 1 and "current" not in out.split("\n")[1] and repr(old_name) in out, out
        if stop_names is not None:
            with pytest.raises(SchemaError, match=stop_names):
                _drain(src)
        else:
            with structlog.testing.capture_logs() as logs:
                _drain(src)  # every cycle checks the catalog (heartbeat_interval)
            warned = [e for e in logs if e["event"] == "catalog_check_failed"]
            assert warned and repr(old_name) in warned[0]["error"], logs
    finally:
        src.close()
        store.dispose()

    # The operator makes the config follow the DDL and installs the triggers again.
    new_cfg = _config(erp, tmp_path, columns, cond)
    assert main(["triggers", "install", "--config", str(new_cfg)]) == 0
    rc, out = _status(new_cfg, capsys)
    assert rc == 0, out
    erp.execute(writes[1])  # changes after the install are captured with the new triggers
    cfg = load_config(new_cfg)
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    src.start()
    try:
        _drain(src)
        assert _staging(store, columns) == _source(erp, columns, cond)
    finally:
        src.close()
        store.dispose()
    assert b"SECRET" not in (tmp_path / "staging.db").read_bytes()


# ----------------------------------------------------------------------------------- MariaDB
@pytest.fixture
def my_erp(mariadb_url: str) -> Iterator[Erp]:
    erp = new_mysql_db(mariadb_url)
    try:
        erp.execute(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(40), "
            "region VARCHAR(20), secret VARCHAR(40), qty DECIMAL(10,2))",
            "INSERT INTO customers VALUES (1, 'a', 'north', 's', 1), (2, 'b', 'south', 's', 2)",
        )
        yield erp
    finally:
        erp.drop()


@pytest.mark.parametrize(
    ("ddl", "column", "failing"),
    [
        (
            "ALTER TABLE customers RENAME COLUMN name TO full_name",
            "name",
            [
                "INSERT INTO customers (id, full_name) VALUES (3, 'c')",
                "UPDATE customers SET qty = 5",
            ],
        ),
        (
            "ALTER TABLE customers DROP COLUMN region",
            "region",
            ["INSERT INTO customers (id) VALUES (3)", "UPDATE customers SET qty = 5"],
        ),
        (
            "ALTER TABLE customers RENAME COLUMN id TO cid",
            "id",
            ["DELETE FROM customers WHERE cid = 2", "UPDATE customers SET qty = 5"],
        ),
    ],
)
def test_mariadb_ddl_on_a_captured_column_is_named_by_status(
    my_erp: Erp,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ddl: str,
    column: str,
    failing: list[str],
) -> None:
    """MariaDB triggers must name every column: after such DDL the ERP's writes fail with 1054
    until `triggers install`; `triggers status` names the column and says what to do, and the
    daemon refuses to start with the same words."""
    erp = my_erp
    cfg_path = write_config(
        tmp_path / "triggers.toml",
        {
            "erp": {"dsn": erp.url},
            "capture": {"mode": "triggers", "tables": ["customers"]},
            "staging": {"url": f"sqlite:///{tmp_path / 'staging.db'}"},
            "daemon": {"state_dir": str(tmp_path)},
        },
    )
    assert main(["triggers", "install", "--config", str(cfg_path)]) == 0
    erp.execute(ddl)
    for sql in failing:
        with pytest.raises(pymysql.err.OperationalError, match=rf"1054.*'{column}' in '(NEW|OLD)'"):
            erp.execute(sql)
    rc, out = _status(cfg_path, capsys)
    assert rc == 1 and "outdated" in out and repr(column) in out, out
    assert "error 1054" in out and "triggers install" in out and "triggers uninstall" in out
    cfg = load_config(cfg_path)
    store = StagingStore(cfg.staging_url)
    src = TriggerSource(cfg, store)
    with pytest.raises(FatalError, match=rf"{column!r}.*triggers install"):
        src.start()
    src.close()
    store.dispose()
    # Installed again right after the DDL: the ERP's writes go through.
    assert main(["triggers", "install", "--config", str(cfg_path)]) == 0
    for sql in failing:
        erp.execute(sql)
    rc, out = _status(cfg_path, capsys)
    assert rc == 0, out
