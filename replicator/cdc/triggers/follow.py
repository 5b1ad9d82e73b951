"""Following the ERP's schema in trigger mode: what changed in a table, and the mirror made to match.

Trigger capture learns of DDL two ways: a row image with other columns than the mirror's (an
added, dropped or renamed column, seen in order with the rows around it), and a look at the
catalog every ``capture.heartbeat_interval`` for retyped columns (the ERP converts their rows
without firing a trigger, and row images keep their keys). Either way the mirror is altered
here, in the staging transaction of the changes around it, the journal gets a schema event
(``S``), and the caller is told whether the table must also be copied again: when rows not
written since cannot be right (a retyped column's old form; a rename this ERP has no column
numbers to recognise; an added column the ERP filled with a default).

Columns are matched by catalog number where the ERP has a stable one (PostgreSQL's ``attnum``:
a renamed column keeps its values); elsewhere by name, so a rename is a dropped and an added
column. What to do with the answers (the decoders, a re-copy, a mirror keyed anew) is
:class:`~replicator.cdc.triggers.source.TriggerSource`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import structlog

from replicator.cdc.triggers.dialects import Dialect
from replicator.changes import Column, TableSchema
from replicator.errors import SchemaError
from replicator.staging import ApplyTxn, StagingStore

log = structlog.get_logger(__name__, service="capture")


@dataclasses.dataclass
class ColumnChanges:
    """How a table's columns differ from its mirror's (names as the mirror has them)."""

    renamed: dict[str, str]
    dropped: list[str]
    added: list[str]
    retyped: list[str]

    def __bool__(self) -> bool:
        return bool(self.renamed or self.dropped or self.added or self.retyped)


def column_changes(mirror: TableSchema, schema: TableSchema) -> ColumnChanges:
    """Compare ``schema`` (the catalog's) with ``mirror``: renamed columns by catalog number,
    the rest by name."""
    renamed: dict[str, str] = {}
    dropped: list[str] = []
    for col in mirror.columns:
        if schema.column(col.name) is not None:
            continue
        now = next((c for c in schema.columns if col.attnum and c.attnum == col.attnum), None)
        if now is not None and mirror.column(now.name) is None:
            renamed[col.name] = now.name
        else:
            dropped.append(col.name)
    before = {renamed.get(c.name, c.name): c for c in mirror.columns}
    added = [c.name for c in schema.columns if c.name not in before]
    retyped = [
        c.name
        for c in schema.columns
        if c.name in before and before[c.name].type_name != c.type_name
    ]
    return ColumnChanges(renamed, dropped, added, retyped)


def with_types(mirror: TableSchema, changed: dict[str, Column]) -> TableSchema | None:
    """``mirror`` with the types of ``changed`` columns, or None when no type differs."""
    cols = tuple(
        dataclasses.replace(c, type_name=new.type_name, type_oid=new.type_oid)
        if (new := changed.get(c.name)) is not None and new.type_name != c.type_name
        else c
        for c in mirror.columns
    )
    if cols == mirror.columns:
        return None
    return TableSchema(mirror.schema, mirror.name, cols, mirror.key)


def key_changed(table: str, mirror: TableSchema, schema: TableSchema) -> bool:
    """Whether ``table``'s key is another than its mirror's (said in the log when it is): such a
    mirror cannot be altered into the new key, a copy with the new key must replace it."""
    if mirror.key == schema.key:
        return False
    log.warning(
        "mirror_key_changed",
        table=table,
        before=list(mirror.key),
        now=list(schema.key),
        hint="the table is copied again with the new key",
    )
    return True


class SchemaFollow:
    """The ERP's catalog and the mirrors of one trigger-capture source."""

    def __init__(self, dialect: Dialect, store: StagingStore, source: str) -> None:
        self.dialect = dialect
        self.store = store
        self.source = source

    def catalog_schema(self, table: str) -> TableSchema:
        """``table`` as the ERP's catalog describes it now (SchemaError when it cannot be
        captured as it is)."""
        conn = self.dialect.connect("capture-setup")
        try:
            schema: TableSchema = self.dialect.table_schema(conn, table)
        finally:
            conn.close()
        return schema

    def follow(
        self, table: str, mirror: TableSchema, schema: TableSchema, txn: ApplyTxn, copying: bool
    ) -> bool:
        """Alter ``table``'s mirror from ``mirror`` to ``schema`` in ``txn`` (after flushing the
        changes made in the old shape) and journal it. Whether the table must also be copied
        again (``copying``: a copy of it is under way, in the old shape)."""
        ch = column_changes(mirror, schema)
        if not ch:
            return False  # an image from triggers older than the table: nothing to follow
        conn = txn.conn
        txn.flush()  # the changes before the DDL, in the shape they were made in
        self.store.alter_mirror(
            conn, schema, renamed=ch.renamed, dropped=ch.dropped, retyped=ch.retyped
        )
        self.store.journal_event(conn, self.source, table, "S", "")
        log.warning(
            "mirror_schema_changed",
            table=table,
            renamed=ch.renamed or None,
            dropped=ch.dropped or None,
            added=ch.added or None,
            retyped=ch.retyped or None,
        )
        unmatched = bool(ch.dropped and ch.added and not any(c.attnum for c in mirror.columns))
        filled: list[str] = []
        if ch.added and not unmatched:
            with self.dialect.connection("capture-setup") as erp:
                filled = self.dialect.filled_columns(erp, table, ch.added)
        if not (unmatched or ch.retyped or filled or copying):
            return False
        # Rows not written since hold the old type's form, or (no stable column numbers: a
        # rename reads as a drop and an add) no value under the new name, or NULL in an added
        # column the ERP filled (a default); a copy under way holds the old shape. Copy the
        # table again, online, in the new shape.
        log.warning(
            "table_recopy_after_schema_change",
            table=table,
            retyped=ch.retyped or None,
            rename_not_recognised=unmatched or None,
            filled=filled or None,
            hint="the table is copied again online; staging equals the source when done",
        )
        return True

    def find_retyped(self, tables: Iterable[str]) -> dict[str, dict[str, Column]]:
        """Columns the ERP retyped (``ALTER COLUMN ... TYPE``, ``MODIFY``), per table of
        ``tables`` that has a mirror, as the catalog has them. Only the types of columns the
        mirror has are compared; added, dropped and renamed columns are followed from the row
        images, in order with the rows."""
        now: dict[str, TableSchema] = {}
        with self.dialect.connection("capture-setup") as conn:
            for t in tables:
                try:
                    now[t] = self.dialect.table_schema(conn, t)
                except SchemaError as exc:  # gone or keyless now: its row images will tell
                    log.warning("catalog_check_failed", table=t, error=str(exc))
        found: dict[str, dict[str, Column]] = {}
        for table, schema in now.items():
            info = self.store.mirror(table)
            if info is None:
                continue
            changed: dict[str, Any] = {
                c.name: new
                for c in info.schema.columns
                if (new := schema.column(c.name)) is not None and new.type_name != c.type_name
            }
            if changed:
                found[table] = changed
        return found
