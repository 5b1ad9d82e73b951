"""Journal ids become visible in commit order on PostgreSQL staging, so no consumer skips one.

A consumer's cursor is a journal id. If a transaction that drew smaller ids committed after one
that drew larger ids, a consumer reading in between would move its cursor past entries that
were not yet visible and never see them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.staging import StagingStore
from tests.conftest import PgServer
from tests.helpers import wait_until

SCHEMA = TableSchema(
    "public",
    "items",
    (Column("id", "integer", 23), Column("qty", "integer", 23)),
    ("id",),
)


@pytest.fixture
def pg_staging(pg_server: PgServer) -> Iterator[tuple[str, str]]:
    name = pg_server.createdb("journal")
    try:
        yield pg_server.url(name), pg_server.dsn(name)
    finally:
        pg_server.dropdb(name)


def _waiting_for_journal_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    return bool(row and row[0])


def test_a_later_writer_waits_for_the_earlier_commit(pg_staging: tuple[str, str]) -> None:
    url, dsn = pg_staging
    store = StagingStore(url)
    store.setup()
    store.ensure_mirror(SCHEMA)
    reader = store.journal_reader("pusher")

    first = store.begin("a")
    first.apply_many(Change("public.items", "I", {"id": i, "qty": 1}) for i in range(3))
    first.flush()  # its journal ids are drawn now; it commits later

    done = threading.Event()

    def second_writer() -> None:
        txn = store.begin("b")
        txn.apply(Change("public.items", "I", {"id": 100, "qty": 1}))
        txn.commit(Checkpoint("b", "1"))
        done.set()

    t = threading.Thread(target=second_writer, daemon=True)
    t.start()
    wait_until(lambda: _waiting_for_journal_lock(dsn), timeout=30)
    # While the first transaction is open, nothing of the second may be visible: a consumer
    # reading now would otherwise move past the first transaction's smaller ids.
    assert not done.is_set()
    assert reader.read(100) == []

    first.commit(Checkpoint("a", "1"))
    t.join(30)
    assert done.is_set()
    entries = reader.read(100)
    assert [(e["source"], e["key"]) for e in entries] == [
        ("a", [0]),
        ("a", [1]),
        ("a", [2]),
        ("b", [100]),
    ]
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)
    store.dispose()
