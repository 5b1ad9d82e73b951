"""How a table changed shape: a Relation message matched to the mirror by catalog number.

No server: the catalog is given as it would read after each DDL, so each rule is shown on its
own (the end-to-end behaviour, with writers, is in test_schema_changes.py).
"""

from __future__ import annotations

from replicator.cdc.pgoutput import Relation, RelationColumn
from replicator.cdc.schema_follow import match_relation, same_shape
from replicator.changes import Column, TableSchema

INT, TEXT, NUM = 23, 25, 1700
KNOWN = TableSchema(
    "public",
    "items",
    (
        Column("id", "integer", INT, True, 1),
        Column("name", "text", TEXT, True, 2),
        Column("qty", "integer", INT, True, 3),
    ),
    ("id",),
)


def rel(*cols: tuple[str, int, bool], identity: str = "d") -> Relation:
    return Relation(
        1, "public", "items", identity, [RelationColumn(n, oid, -1, key) for n, oid, key in cols]
    )


def types(r: Relation) -> list[str]:
    names = {INT: "integer", TEXT: "text", NUM: "numeric(12,3)"}
    return [names[c.type_oid] for c in r.columns]


def test_unchanged_shape_is_recognised() -> None:
    r = rel(("id", INT, True), ("name", TEXT, False), ("qty", INT, False))
    assert same_shape(r, KNOWN, types(r))


def test_rename_keeps_the_column_by_its_number() -> None:
    r = rel(("id", INT, True), ("title", TEXT, False), ("qty", INT, False))
    catalog = {1: ("id", False), 2: ("title", False), 3: ("qty", False)}
    ch = match_relation(r, KNOWN, types(r), catalog)
    assert ch.renamed == {"name": "title"} and not ch.dropped and not ch.added
    assert not ch.recopy
    assert [c.attnum for c in ch.schema.columns] == [1, 2, 3]


def test_drop_and_add_are_not_a_rename() -> None:
    r = rel(("id", INT, True), ("name", TEXT, False), ("price", NUM, False))
    catalog = {1: ("id", False), 2: ("name", False), 3: ("qty", True), 4: ("price", False)}
    ch = match_relation(r, KNOWN, types(r), catalog)
    assert ch.dropped == ["qty"] and not ch.renamed
    assert [c.name for c in ch.added] == ["price"] and ch.added[0].attnum == 4
    assert not ch.recopy


def test_type_change_and_key_change_need_a_recopy() -> None:
    r = rel(("id", INT, True), ("name", TEXT, False), ("qty", NUM, False))
    catalog = {1: ("id", False), 2: ("name", False), 3: ("qty", False)}
    ch = match_relation(r, KNOWN, types(r), catalog)
    assert ch.retyped == ["qty"] and ch.recopy and not ch.key_changed

    r = rel(("id", INT, False), ("name", TEXT, True), ("qty", INT, False))
    ch = match_relation(r, KNOWN, types(r), catalog)
    assert ch.key_changed and ch.schema.key == ("name",) and ch.recopy


def test_stream_behind_the_catalog_is_unsure() -> None:
    # The stream says "title"; the catalog has renamed it again since: no certain match.
    r = rel(("id", INT, True), ("title", TEXT, False), ("qty", INT, False))
    catalog = {1: ("id", False), 2: ("heading", False), 3: ("qty", False)}
    ch = match_relation(r, KNOWN, types(r), catalog)
    assert ch.unsure and ch.recopy
