"""How a table changed shape, read from a pgoutput Relation message and the ERP's catalog.

Logical capture meets a schema change as a Relation message in the stream: names, type oids,
key flags. Matching that against the mirror's schema by name alone would take a renamed column
for a dropped and an added one (and lose its values). The catalog numbers columns (``attnum``):
a renamed column keeps its number, a dropped one stays under its number marked dropped. This
module turns the message and the catalog into a :class:`ShapeChange` — a pure function, so the
rules are tested without a server — and holds the two catalog queries it needs. What to do with
the change (alter the mirror, re-copy the table) is the streaming source's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from replicator.cdc.pgoutput import Relation
from replicator.changes import Column, TableSchema

Catalog = dict[int, tuple[str, bool]]
"""A table's columns in the catalog: attnum → (name, dropped)."""


@dataclass(frozen=True)
class ShapeChange:
    """The new shape of a table and how its columns map from the mirror's."""

    schema: TableSchema
    renamed: dict[str, str]
    dropped: list[str]
    added: list[Column]
    retyped: list[str]
    key_changed: bool
    unsure: bool  # the stream is behind the catalog: what a column became is not certain

    @property
    def recopy(self) -> bool:
        """Only a re-copy of the table makes the mirror equal to the source again."""
        return self.unsure or self.key_changed or bool(self.retyped)


def same_shape(rel: Relation, known: TableSchema, type_names: list[str]) -> bool:
    """Whether the message describes the shape the mirror already has (a typmod change,
    numeric(12,2) to numeric(12,3), keeps the type's oid, hence the declared names too)."""
    rel_key = tuple(rc.name for rc in rel.columns if rc.is_key)
    return (
        [c.name for c in rel.columns] == [c.name for c in known.columns]
        and all(known.columns[i].type_oid == rc.type_oid for i, rc in enumerate(rel.columns))
        and (rel.replica_identity != "d" or not rel_key or rel_key == known.key)
        and type_names == [c.type_name for c in known.columns]
    )


def match_relation(
    rel: Relation, known: TableSchema, type_names: list[str], catalog: Catalog
) -> ShapeChange:
    """Match the message's columns to the mirror's by catalog number (see the module doc)."""
    by_name = {name: num for num, (name, dropped) in catalog.items() if not dropped}
    rel_names = {rc.name for rc in rel.columns}
    known_names = {c.name for c in known.columns}
    renamed: dict[str, str] = {}
    dropped: list[str] = []
    unsure = False
    for col in known.columns:
        if col.name in rel_names:
            continue
        entry = catalog.get(col.attnum) if col.attnum else None
        if entry is not None and entry[1]:
            dropped.append(col.name)
        elif entry is not None and entry[0] in rel_names and entry[0] not in known_names:
            renamed[col.name] = entry[0]
        elif entry is None and col.attnum == 0 and len(rel.columns) < len(known.columns):
            dropped.append(col.name)  # no number recorded: only a pure drop is certain
        else:
            unsure = True
    before = {renamed.get(c.name, c.name): c for c in known.columns}
    columns: list[Column] = []
    retyped: list[str] = []
    for rc, tname in zip(rel.columns, type_names, strict=True):
        old = before.get(rc.name)
        num = by_name.get(rc.name, old.attnum if old else 0)
        columns.append(Column(rc.name, tname, rc.type_oid, True, num))
        if old is not None and (old.type_oid != rc.type_oid or old.type_name != tname):
            retyped.append(rc.name)
    added = [c for c in columns if c.name not in before]
    rel_key = tuple(rc.name for rc in rel.columns if rc.is_key)
    key_changed = rel.replica_identity == "d" and bool(rel_key) and rel_key != known.key
    key = rel_key if key_changed else known.key
    if any(k not in {c.name for c in columns} for k in key):
        key_changed, unsure = True, True
    return ShapeChange(
        TableSchema(known.schema, known.name, tuple(columns), key),
        renamed,
        dropped,
        added,
        retyped,
        key_changed,
        unsure,
    )


def declared_types(conn: psycopg.Connection[Any], rel: Relation) -> list[str]:
    """The declared types of a Relation message's columns, as ``format_type`` spells them."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT format_type(t.oid, t.mod) FROM unnest(%s::oid[], %s::int[]) "
            "WITH ORDINALITY AS t(oid, mod, n) ORDER BY t.n",
            ([rc.type_oid for rc in rel.columns], [rc.type_mod for rc in rel.columns]),
        ).fetchall()
    ]


def catalog_columns(conn: psycopg.Connection[Any], relid: int) -> Catalog:
    """The table's columns in the catalog now, dropped ones included."""
    return {
        num: (name, dropped)
        for num, name, dropped in conn.execute(
            "SELECT attnum, attname, attisdropped FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0",
            (relid,),
        ).fetchall()
    }
