"""An ERP table rewritten while the initial copy runs: the copy starts again, no rows are lost.

``ALTER TABLE ... TYPE`` rewrites a PostgreSQL table into a new file whose rows all carry the
DDL's transaction id, so a snapshot taken before it sees the table *empty*. Committed after the
initial copy's snapshot and before the copy reaches the table, it would leave the mirror empty:
a rewrite fires no row triggers, and logical decoding sends no rows for it either.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from replicator.cdc import initial_copy
from replicator.cdc.logical import LogicalSource
from replicator.cdc.triggers import TriggerSource
from replicator.config import parse_config
from replicator.errors import RetryableError
from replicator.staging import StagingStore
from tests.capture_worker import install_triggers
from tests.helpers import assert_staging_equals_source

ROWS = 500


def _tables(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        for t in ("a", "items"):
            c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int)")
            c.execute(f"INSERT INTO {t} SELECT g, g FROM generate_series(1, {ROWS}) g")


def _rewrite_items(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("ALTER TABLE items ALTER COLUMN v TYPE bigint")


def test_trigger_initial_copy_starts_again_after_a_rewrite(erp_db: str, tmp_path: Path) -> None:
    _tables(erp_db)
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = install_triggers(erp_db, staging, ["a", "items"])
    store = StagingStore(staging)
    src = TriggerSource(cfg, store)
    copy_sql = src.dialect.copy_sql
    calls = [0]

    def rewrite_before_items(schema: Any, table: str) -> str:
        calls[0] += 1
        if table.endswith("items") and calls[0] <= 2:  # after the snapshot, before its SELECT
            _rewrite_items(erp_db)
        return copy_sql(schema, table)

    src.dialect.copy_sql = rewrite_before_items  # type: ignore[method-assign]
    with pytest.raises(RetryableError, match="rewritten"):
        src.start()
    src.close()
    assert store.load_checkpoint("erp") is None  # nothing of that copy was committed

    src = TriggerSource(cfg, store)  # what the supervisor does after the error
    src.start()
    src.run_cycle(0.1, threading.Event())
    src.close()
    assert_staging_equals_source(erp_db, staging, ["public.a", "public.items"], 30)
    assert len(store.rows("public.items")) == ROWS


def test_logical_initial_copy_starts_again_after_a_rewrite(
    erp_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tables(erp_db)
    staging = f"sqlite:///{tmp_path / 's.db'}"
    cfg = parse_config(
        {
            "erp": {"dsn": erp_db},
            "capture": {"mode": "logical", "tables": ["public.a", "public.items"]},
            "staging": {"url": staging},
        }
    )
    real_copy_table = initial_copy.copy_table
    fired: list[bool] = []

    def rewrite_before_items(snap: Any, store: Any, source: Any, schema: Any, cap: Any) -> int:
        if schema.name == "items" and not fired:  # inside the exported snapshot, before COPY
            fired.append(True)
            _rewrite_items(erp_db)
        return real_copy_table(snap, store, source, schema, cap)

    monkeypatch.setattr(initial_copy, "copy_table", rewrite_before_items)
    store = StagingStore(staging)
    src = LogicalSource(cfg, store)
    with pytest.raises(RetryableError, match="rewritten"):
        src.start()
    src.close()
    cp = store.load_checkpoint("erp")
    assert cp is not None and cp.state == "snapshot"  # the next start copies again

    src = LogicalSource(cfg, store)
    src.start()
    stop = threading.Event()
    src.run_cycle(0.5, stop)
    src.close()
    assert fired
    assert_staging_equals_source(erp_db, staging, ["public.a", "public.items"], 30)
    assert len(store.rows("public.items")) == ROWS
