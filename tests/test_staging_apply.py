"""The apply fast path and the journal's shape.

- flushes write in key order, and on PostgreSQL large groups of upserts and deletes go through
  COPY: whatever the path, the mirror ends up as applying the changes one by one would leave it;
- ``apply_many`` is ``apply`` for each change;
- journal ids never repeat, even after pruning (the journal has no AUTOINCREMENT), so consumer
  cursors stay exact; a journal of an earlier version is upgraded once by setup, ids kept;
- a reader of some tables moves past other tables' entries once (SQLite).
"""

from __future__ import annotations

import datetime as dt
import decimal
import random
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.staging import StagingStore
from replicator.staging.apply import _COPY_THRESHOLD, ApplyTxn, _by_key

SCHEMA = TableSchema(
    "public",
    "items",
    (
        Column("id", "integer", 23),
        Column("sku", "text", 25),
        Column("qty", "integer", 23),
    ),
    ("id",),
)
TWO_KEYS = TableSchema(
    "public",
    "lines",
    (Column("a", "integer", 23), Column("b", "text", 25), Column("qty", "integer", 23)),
    ("a", "b"),
)
OTHER = TableSchema("public", "other", (Column("id", "integer", 23),), ("id",))


def _store(url: str) -> StagingStore:
    store = StagingStore(url)
    store.setup()
    for schema in (SCHEMA, TWO_KEYS, OTHER):
        store.ensure_mirror(schema)
    return store


def _changes(n: int, keys: int, seed: int) -> list[Change]:
    """Mixed changes over ``keys`` keys of both tables, in random key order."""
    rnd = random.Random(seed)
    out: list[Change] = []
    for i in range(n):
        k = rnd.randrange(keys)
        r = rnd.random()
        pos = str(i)
        if rnd.random() < 0.5:
            if r < 0.3:
                out.append(Change("public.items", "D", None, {"id": k}, pos))
            elif r < 0.5:
                out.append(Change("public.items", "U", {"id": k, "qty": i}, None, pos))
            elif r < 0.55:  # the key changes
                new = rnd.randrange(keys)
                values = {"id": new, "sku": f"m{i}", "qty": i}
                out.append(Change("public.items", "U", values, {"id": k}, pos))
            else:
                out.append(Change("public.items", "I", {"id": k, "sku": f"s{i}", "qty": i}))
        else:
            key = {"a": k % 7, "b": f"b{k}"}
            if r < 0.3:
                out.append(Change("public.lines", "D", None, key, pos))
            else:
                out.append(Change("public.lines", "U", {**key, "qty": i}, None, pos))
    return out


def _model(changes: list[Change]) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """The rows applying ``changes`` one by one leaves."""
    rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {"items": {}, "lines": {}}
    for ch in changes:
        name = ch.table.split(".")[1]
        keycols = SCHEMA.key if name == "items" else TWO_KEYS.key
        if ch.op == "D":
            assert ch.key is not None
            rows[name].pop(tuple(ch.key[c] for c in keycols), None)
            continue
        assert ch.values is not None
        k = tuple(ch.values[c] for c in keycols)
        if ch.key is not None and tuple(ch.key[c] for c in keycols) != k:
            rows[name].pop(tuple(ch.key[c] for c in keycols), None)
        cols = SCHEMA.columns if name == "items" else TWO_KEYS.columns
        base = rows[name].get(k) or {c.name: None for c in cols}
        rows[name][k] = {**base, **ch.values}
    return rows


def _mirror(store: StagingStore) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    with store.engine.connect() as conn:
        items = conn.exec_driver_sql("SELECT id, sku, qty FROM items").fetchall()
        lines = conn.exec_driver_sql("SELECT a, b, qty FROM lines").fetchall()
    return {
        "items": {(r[0],): {"id": r[0], "sku": r[1], "qty": r[2]} for r in items},
        "lines": {(r[0], r[1]): {"a": r[0], "b": r[1], "qty": r[2]} for r in lines},
    }


def test_batched_sorted_and_copied_writes_equal_one_by_one(
    staging_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches big enough for COPY (PostgreSQL) and small ones, with the journal on: the mirror
    equals the one-by-one model, and every staged change has its journal entry."""
    copied: list[str] = []
    for name in ("_copy_upsert", "_copy_delete"):
        real = getattr(ApplyTxn, name)

        def spy(self: ApplyTxn, *a: Any, _real: Any = real, _name: str = name) -> None:
            copied.append(_name)
            _real(self, *a)

        monkeypatch.setattr(ApplyTxn, name, spy)
    store = _store(staging_url)
    big = 10 * _COPY_THRESHOLD
    changes = _changes(big + 300, 20 * _COPY_THRESHOLD, seed=1)
    chunks = [changes[:big]] + [changes[i : i + 7] for i in range(big, len(changes), 7)]
    for chunk in chunks:
        txn = store.begin("src")
        txn.apply_many(chunk)
        txn.commit(Checkpoint("src", chunk[-1].position or "0"))
    assert _mirror(store) == _model(changes)
    if store.dialect == "postgresql":
        assert set(copied) == {"_copy_upsert", "_copy_delete"}
    entries = store.journal.read(0, limit=10 * len(changes))
    assert entries and [e["id"] for e in entries] == sorted(e["id"] for e in entries)
    store.dispose()


def test_apply_many_is_apply_for_each(tmp_path: Path) -> None:
    changes = _changes(800, 200, seed=2)
    mirrors = []
    for i, many in enumerate((False, True)):
        store = _store(f"sqlite:///{tmp_path / f'{i}.db'}")
        txn = store.begin("src")
        if many:
            txn.apply_many(changes)
        else:
            for ch in changes:
                txn.apply(ch)
        assert txn.applied == len(changes)
        txn.commit(Checkpoint("src", "1"))
        mirrors.append(_mirror(store))
        store.dispose()
    assert mirrors[0] == mirrors[1] == _model(changes)


def test_key_order_falls_back_to_arrival_order_for_mixed_types() -> None:
    assert _by_key([((2,), "b"), ((1,), "a")]) == [((1,), "a"), ((2,), "b")]
    mixed = [((2,), "b"), (("x",), "a"), ((1,), "c")]
    assert sorted(_by_key(mixed), key=repr) == sorted(mixed, key=repr)


def _journal(store: StagingStore, n: int, table: str = "public.items") -> None:
    txn = store.begin("src")
    extra = {"sku": "s", "qty": 1} if table == "public.items" else {}
    txn.apply_many(Change(table, "I", {"id": i, **extra}) for i in range(n))
    txn.commit(Checkpoint("src", "1"))


def test_journal_ids_never_repeat_after_pruning(staging_url: str) -> None:
    store = _store(staging_url)
    _journal(store, 5)
    top = max(e["id"] for e in store.journal.read(0))
    store.journal_commit("pusher", top)
    assert store.journal_prune(-60) == 4  # everything read and old, but the newest stays
    assert [e["id"] for e in store.journal.read(0)] == [top]
    txn = store.begin("src")
    txn.apply(Change("public.items", "U", {"id": 1, "qty": 9}))
    txn.commit(Checkpoint("src", "2"))
    after = store.journal_reader("pusher", ["public.items"]).read(10)
    assert len(after) == 1 and after[0]["id"] > top
    store.dispose()


def test_reader_of_some_tables_moves_past_other_tables_once(tmp_path: Path) -> None:
    store = _store(f"sqlite:///{tmp_path / 's.db'}")
    _journal(store, 3)
    _journal(store, 20, "public.other")
    reader = store.journal_reader("pusher", ["public.items"])
    assert len(reader.read(100)) == 3
    top = max(e["id"] for e in store.journal.read(0, limit=100))
    assert reader.read_upto == top  # the other table's entries were looked at once
    assert reader.read(100) == []
    assert not reader.caught_up()
    reader.commit(reader.read_upto)
    assert reader.caught_up()
    _journal(store, 1)
    assert reader.read(100)[0]["id"] == top + 1
    assert not reader.caught_up()
    store.dispose()


def _old_shape(path: Path, ids: list[int], seq: int) -> None:
    """Make the journal at ``path`` look as an earlier version left it."""
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE sync_journal")
        db.execute(
            "CREATE TABLE sync_journal (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT "
            "NULL, table_name TEXT NOT NULL, op TEXT NOT NULL, row_key TEXT, position TEXT NOT "
            "NULL, at TEXT NOT NULL)"
        )
        db.execute("CREATE INDEX sync_journal_table ON sync_journal (table_name, id)")
        for i in ids:
            db.execute(
                "INSERT INTO sync_journal VALUES (?, 'src', 'public.items', 'U', ?, '1', "
                "'2026-01-01 00:00:00')",
                (i, f"[{i}]"),
            )
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'sync_journal'", (seq,))


def _shape(path: Path) -> tuple[str, list[str]]:
    with sqlite3.connect(path) as db:
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'sync_journal'").fetchone()
        idx = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sync_journal'"
            )
        ]
    return str(sql[0]), idx


def test_setup_upgrades_an_old_journal_keeping_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _store(f"sqlite:///{path}").dispose()
    _old_shape(path, [3, 4, 7], seq=7)
    store = _store(f"sqlite:///{path}")
    sql, idx = _shape(path)
    assert "AUTOINCREMENT" not in sql.upper() and idx == []
    assert [e["id"] for e in store.journal.read(0)] == [3, 4, 7]
    _journal(store, 1)
    assert [e["id"] for e in store.journal.read(7)] == [8]
    store.dispose()


def test_setup_defers_the_upgrade_while_only_autoincrement_knows_the_last_id(
    tmp_path: Path,
) -> None:
    """An earlier version pruned the newest entries: ids up to 9 were used, 4 is the largest
    left. The table keeps its shape (and its high-water mark) until an entry past it exists."""
    path = tmp_path / "s.db"
    _store(f"sqlite:///{path}").dispose()
    _old_shape(path, [3, 4], seq=9)
    store = _store(f"sqlite:///{path}")
    assert "AUTOINCREMENT" in _shape(path)[0].upper()
    assert _shape(path)[1] == []  # the index goes in any case
    _journal(store, 1)
    assert [e["id"] for e in store.journal.read(4)] == [10]
    store.dispose()
    store = _store(f"sqlite:///{path}")
    assert "AUTOINCREMENT" not in _shape(path)[0].upper()
    _journal(store, 1)
    assert [e["id"] for e in store.journal.read(4)] == [10, 11]
    store.dispose()


TYPED_KEYS = TableSchema(
    "public",
    "typed",
    (
        Column("price", "numeric(12,2)", 1700),
        Column("ref", "uuid", 2950),
        Column("day", "date", 1082),
        Column("at", "timestamp with time zone", 1184),
        Column("qty", "integer", 23),
    ),
    ("price", "ref", "day", "at"),
)


@pytest.mark.parametrize("spill", [False, True], ids=["direct", "spilled"])
def test_rows_keyed_by_numeric_uuid_and_temporal_values_can_be_deleted(
    staging_url: str, spill: bool
) -> None:
    """A key of Decimal, UUID, date or datetime values: the delete binds it through the same
    converters as the row was stored with (SQLite stores them as text; its driver cannot bind a
    Decimal or UUID at all)."""
    store = StagingStore(staging_url)
    store.setup()
    store.ensure_mirror(TYPED_KEYS)
    keys = [
        {
            "price": decimal.Decimal(f"{i}.50"),
            "ref": uuid.UUID(int=i),
            "day": dt.date(2026, 1, i),
            "at": dt.datetime(2026, 1, i, 12, 30, 0, 250000, tzinfo=dt.UTC),
        }
        for i in range(1, 4)
    ]
    txn = store.begin("erp")
    txn.apply_many(Change("public.typed", "I", {**k, "qty": 1}) for k in keys)
    txn.commit(Checkpoint("erp", "1"))

    txn = store.begin("erp", spill=True)
    if not spill:
        _ = txn.conn  # open now: the flush writes straight into the mirror
    txn.apply(Change("public.typed", "D", None, keys[1]))
    txn.apply(Change("public.typed", "U", {**keys[2], "qty": 5}))
    txn.flush()  # with spill and no open transaction: parked in a spill table
    txn.commit(Checkpoint("erp", "2"))
    assert [r[-1] for r in store.rows("public.typed")] == [1, 5]
    deleted = [e for e in store.journal.read(0) if e["op"] == "D"]
    assert len(deleted) == 1
    store.dispose()


def test_a_json_number_beyond_64_bits_is_stored_on_sqlite(tmp_path: Path) -> None:
    """A jsonb scalar like 2**70 loads as a Python int SQLite cannot bind (OverflowError, and
    capture retried the batch forever); it is stored as text, like a smaller one."""
    schema = TableSchema(
        "public", "docs", (Column("id", "integer", 23), Column("doc", "jsonb", 3802)), ("id",)
    )
    store = StagingStore(f"sqlite:///{tmp_path / 's.db'}")
    store.setup()
    store.ensure_mirror(schema)
    txn = store.begin("erp")
    txn.apply_many(
        Change("public.docs", "I", {"id": i, "doc": v})
        for i, v in enumerate([2**70, 5, {"n": 2**70}, "text"], 1)
    )
    txn.commit(Checkpoint("erp", "1"))
    assert store.rows("public.docs") == [
        (1, str(2**70)),
        (2, "5"),
        (3, '{"n":1180591620717411303424}'),
        (4, "text"),
    ]
    store.dispose()
