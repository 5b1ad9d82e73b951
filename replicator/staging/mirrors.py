"""The mirror tables: their catalogue (``sync_tables``), their DDL, and the SQL that writes and
reads their rows.

A mirror holds the current rows of one captured source table, under the name
:meth:`Mirrors.mirror_name` gives it; its definition (columns, types, key) is recorded in
``sync_tables`` in the transaction that creates or alters it, so another process (status, a
pusher, the stream sink) finds it with :meth:`Mirrors.load`. A *shadow* mirror is fed beside a
live one during an online re-copy and then put in its place.

Column types: built-in PostgreSQL types are recreated as they are on PostgreSQL staging and
user-defined ones (enums, domains) as text; on SQLite a coarse affinity per category (see
:mod:`replicator.staging.values`).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.changes import Column, TableSchema
from replicator.db import reading
from replicator.staging.engine import StagingDb
from replicator.staging.values import (
    BUILTIN_OID_LIMIT,
    column_category,
    params,
    pg_param,
    pg_type,
    scalar_text,
    sqlite_converter,
    sqlite_type,
    to_json,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MirrorInfo:
    """A mirror table and how to write into it."""

    source_table: str
    name: str
    schema: TableSchema
    journaled: bool = True  # a shadow mirror (online re-copy) is not: the live mirror is


class Mirrors:
    """The mirrors of one staging store, by source table (``schema.table``)."""

    def __init__(self, db: StagingDb) -> None:
        self.db = db
        self._by_table: dict[str, MirrorInfo] = {}  # never rebound: ``get`` is its method
        self._sql_cache: dict[tuple[Any, ...], str] = {}
        # The mirror of a table, or None: the dictionary's own method, since the apply path
        # asks once per change and a Python method around it costs a frame each time.
        self.get: Callable[[str], MirrorInfo | None] = self._by_table.get

    def __getitem__(self, table: str) -> MirrorInfo:
        """The mirror of ``table`` (KeyError when it has none)."""
        return self._by_table[table]

    def refresh(self) -> None:
        """Re-read the definitions (another process may have added tables or columns)."""
        self.load()
        self._sql_cache.clear()

    def find(self, table: str) -> MirrorInfo | None:
        """The mirror of ``table``, re-reading the catalogue once when it is not known (the
        capture source, another process, may have created it since)."""
        info = self._by_table.get(table)
        if info is None:
            self.load()
            info = self._by_table.get(table)
        return info

    def empty(self, conn: sa.Connection, tables: Iterable[str]) -> None:
        """Delete every row of the mirrors of ``tables``, in ``conn``'s transaction."""
        for t in tables:
            info = self._by_table.get(t)
            if info is not None:
                conn.exec_driver_sql(f"DELETE FROM {self.db.q(info.name)}")

    def load(self) -> None:
        with reading(self.db.engine) as conn:
            rows = conn.exec_driver_sql(
                "SELECT source_table, mirror_name, definition FROM sync_tables"
            ).fetchall()
        for source_table, mirror_name, definition in rows:
            d = json.loads(definition)
            schema = TableSchema(
                schema=d["schema"],
                name=d["name"],
                columns=tuple(Column(**c) for c in d["columns"]),
                key=tuple(d["key"]),
            )
            self._by_table[source_table] = MirrorInfo(source_table, mirror_name, schema)

    @staticmethod
    def mirror_name(table: str) -> str:
        schema, _, name = table.partition(".")
        return name if schema == "public" else f"{schema}__{name}"

    def all(self) -> list[MirrorInfo]:
        return list(self._by_table.values())

    def col_ddl(self, col: Column) -> str:
        typ = pg_type(col) if self.db.dialect == "postgresql" else sqlite_type(col)
        return f"{self.db.q(col.name)} {typ}"

    def write_definition(self, conn: sa.Connection, name: str, schema: TableSchema) -> None:
        """Record what a mirror holds (``sync_tables``), in the caller's transaction."""
        definition = to_json(
            {
                "schema": schema.schema,
                "name": schema.name,
                "columns": [
                    {
                        "name": c.name,
                        "type_name": c.type_name,
                        "type_oid": c.type_oid,
                        "nullable": c.nullable,
                        "attnum": c.attnum,
                    }
                    for c in schema.columns
                ],
                "key": list(schema.key),
            }
        )
        now = self.db.now()
        updated = conn.exec_driver_sql(
            "UPDATE sync_tables SET mirror_name = %s, definition = %s, updated_at = %s "
            "WHERE source_table = %s" % ((self.db.ph,) * 4),
            (name, definition, now, schema.qualified),
        ).rowcount
        if not updated:
            conn.exec_driver_sql(
                "INSERT INTO sync_tables (source_table, mirror_name, definition, updated_at) "
                "VALUES (%s, %s, %s, %s)" % ((self.db.ph,) * 4),
                (schema.qualified, name, definition, now),
            )

    def alter_mirror(
        self,
        conn: sa.Connection,
        schema: TableSchema,
        *,
        renamed: dict[str, str],
        dropped: Sequence[str],
        retyped: Sequence[str],
    ) -> MirrorInfo:
        """Make a mirror follow a change of its source table, in ``conn``'s transaction.

        Renamed columns keep their values; dropped columns are dropped (staging equals the
        source, not its history); columns the source gained are added; on PostgreSQL staging a
        retyped column is converted (through its text form, else kept as text until the table's
        re-copy replaces it; SQLite stores any value in any column). The definition becomes
        ``schema``.
        """
        info = self._by_table[schema.qualified]
        q = self.db.q
        table = q(info.name)
        for before, after in renamed.items():
            conn.exec_driver_sql(f"ALTER TABLE {table} RENAME COLUMN {q(before)} TO {q(after)}")
        for gone in dropped:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {q(gone)}")
        have = {renamed.get(c.name, c.name) for c in info.schema.columns} - set(dropped)
        for col in schema.columns:
            if col.name not in have:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {self.col_ddl(col)}")
        if self.db.dialect == "postgresql":
            for name in retyped:
                retype = schema.column(name)
                assert retype is not None
                typ = pg_type(retype)
                try:
                    with conn.begin_nested():
                        conn.exec_driver_sql(
                            f"ALTER TABLE {table} ALTER COLUMN {q(name)} TYPE {typ} "
                            f"USING {q(name)}::text::{typ}"
                        )
                except sa.exc.DBAPIError:
                    conn.exec_driver_sql(
                        f"ALTER TABLE {table} ALTER COLUMN {q(name)} TYPE text USING {q(name)}::text"
                    )
        self.write_definition(conn, info.name, schema)
        altered = MirrorInfo(schema.qualified, info.name, schema)
        self._by_table[schema.qualified] = altered
        self._sql_cache.clear()
        return altered

    def ensure_mirror(self, schema: TableSchema, conn: sa.Connection | None = None) -> MirrorInfo:
        """Create the mirror of a source table, or add columns the source gained (columns it no
        longer has stay until :meth:`alter_mirror` follows the change that removed them)."""
        if conn is None:
            with self.db.engine.begin() as c:
                return self.ensure_mirror(schema, c)
        name = self.mirror_name(schema.qualified)
        known = self._by_table.get(schema.qualified)
        if known is None:
            cols = ", ".join(self.col_ddl(c) for c in schema.columns)
            pk = ", ".join(self.db.q(k) for k in schema.key)
            conn.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {self.db.q(name)} ({cols}, PRIMARY KEY ({pk}))"
            )
            merged = schema
        else:
            have = {c.name for c in known.schema.columns}
            added = [c for c in schema.columns if c.name not in have]
            for col in added:
                conn.exec_driver_sql(
                    f"ALTER TABLE {self.db.q(name)} ADD COLUMN {self.col_ddl(col)}"
                )
                log.info(
                    "mirror_column_added",
                    table=schema.qualified,
                    column=col.name,
                    type=col.type_name,
                )
            if (
                not added
                and known.schema.key == schema.key
                and all(known.schema.column(c.name) == c for c in schema.columns)
            ):
                return known
            kept = [c for c in known.schema.columns if schema.column(c.name) is None]
            merged = TableSchema(
                schema.schema, schema.name, tuple(schema.columns) + tuple(kept), schema.key
            )
        self.write_definition(conn, name, merged)
        info = MirrorInfo(schema.qualified, name, merged)
        self._by_table[schema.qualified] = info
        self._sql_cache.clear()
        return info

    def backfill_column(self, conn: sa.Connection, table: str, column: str, value: Any) -> None:
        """Set ``column`` of every row of a mirror (rows that predate an added column)."""
        info = self._by_table[table]
        col = info.schema.column(column)
        v = scalar_text(value) if self.db.dialect == "sqlite" else pg_param(col, value)
        conn.exec_driver_sql(
            f"UPDATE {self.db.q(info.name)} SET {self.db.q(column)} = {self.db.ph}", (v,)
        )

    # -- online re-copy ----------------------------------------------------------------------
    @staticmethod
    def shadow_of(table: str) -> str:
        """The name under which the shadow mirror of ``table`` is applied into."""
        return f"{table}#recopy"

    def ensure_shadow(
        self, schema: TableSchema, *, fresh: bool, conn: sa.Connection | None = None
    ) -> MirrorInfo:
        """A shadow mirror for an online re-copy of a table (see :mod:`replicator.cdc.snapshot`):
        fed beside the live mirror, not journaled, put in its place by :meth:`swap_shadow`.
        ``fresh`` starts it empty; otherwise a copy interrupted by a crash resumes into it."""
        name = f"_sync_recopy__{self.mirror_name(schema.qualified)}"
        cols = ", ".join(self.col_ddl(c) for c in schema.columns)
        pk = ", ".join(self.db.q(k) for k in schema.key)
        with contextlib.ExitStack() as stack:
            if conn is None:
                conn = stack.enter_context(self.db.engine.begin())
            if fresh:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.db.q(name)}")
            conn.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {self.db.q(name)} ({cols}, PRIMARY KEY ({pk}))"
            )
        info = MirrorInfo(self.shadow_of(schema.qualified), name, schema, journaled=False)
        self._by_table[info.source_table] = info
        self._sql_cache.clear()
        return info

    def swap_shadow(self, conn: sa.Connection, table: str) -> None:
        """Put the completed shadow of ``table`` in place of its mirror, in ``conn``'s transaction."""
        shadow = self._by_table.pop(self.shadow_of(table))
        live = self._by_table[table]
        q = self.db.q
        conn.exec_driver_sql(f"DROP TABLE {q(live.name)}")
        conn.exec_driver_sql(f"ALTER TABLE {q(shadow.name)} RENAME TO {q(live.name)}")
        if self.db.dialect == "postgresql":  # the primary key's index keeps the shadow's name
            conn.exec_driver_sql(
                f"ALTER INDEX IF EXISTS {q(shadow.name + '_pkey')} RENAME TO {q(live.name + '_pkey')}"
            )
        self.write_definition(conn, live.name, shadow.schema)
        self._by_table[table] = MirrorInfo(table, live.name, shadow.schema)
        self._sql_cache.clear()

    # -- writing rows ---------------------------------------------------------------------------
    def converter(self, info: MirrorInfo, cols: Sequence[str]) -> Any:
        """A function turning a row of Python values into driver parameters for ``cols``."""
        names = tuple(cols)
        if self.db.dialect == "sqlite":
            # Only columns whose values need converting pay for it (ints, text, floats, blobs
            # go to SQLite as they are), with a converter chosen once per column type.
            convs = tuple(sqlite_converter(info.schema.column(c)) for c in names)
            return functools.partial(params, names, convs)
        schema = info.schema
        typed = [schema.column(c) for c in names]
        plain = all(
            c is not None and column_category(c) != "json" and (c.type_oid or 0) < BUILTIN_OID_LIMIT
            for c in typed
        )
        if plain:
            return functools.partial(params, names, (None,) * len(names))
        pairs = list(zip(names, typed, strict=True))
        return lambda values: tuple(pg_param(t, values[c]) for c, t in pairs)

    def key_params(self, info: MirrorInfo) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
        """A function turning a row key (Python values in key order) into driver parameters,
        through the same converters as the row's values, so a delete finds the stored row (on
        SQLite a numeric, uuid or temporal key is stored as text; the driver cannot bind a
        Decimal or UUID at all)."""
        keycols = info.schema.key
        conv = self.converter(info, keycols)
        if self.db.dialect == "sqlite" and all(
            sqlite_converter(info.schema.column(c)) is None for c in keycols
        ):
            return lambda k: tuple(k)
        return lambda k: conv(dict(zip(keycols, k, strict=True)))

    def upsert_sql(self, info: MirrorInfo, cols: tuple[str, ...]) -> str:
        ck = ("upsert", info.name, cols)
        sql = self._sql_cache.get(ck)
        if sql is None:
            collist = ", ".join(self.db.q(c) for c in cols)
            ph = ", ".join([self.db.ph] * len(cols))
            sql = (
                f"INSERT INTO {self.db.q(info.name)} ({collist}) VALUES ({ph}) "
                f"{self.conflict_sql(info, cols)}"
            )
            self._sql_cache[ck] = sql
        return sql

    def conflict_sql(self, info: MirrorInfo, cols: Sequence[str]) -> str:
        """The ``ON CONFLICT`` clause of an upsert of ``cols`` into a mirror."""
        q = self.db.q
        key = info.schema.key
        sets = [f"{q(c)} = excluded.{q(c)}" for c in cols if c not in key]
        action = f"DO UPDATE SET {', '.join(sets)}" if sets else "DO NOTHING"
        return f"ON CONFLICT ({', '.join(q(k) for k in key)}) {action}"

    def delete_sql(self, info: MirrorInfo) -> str:
        ck = ("delete", info.name)
        sql = self._sql_cache.get(ck)
        if sql is None:
            where = " AND ".join(f"{self.db.q(k)} = {self.db.ph}" for k in info.schema.key)
            sql = f"DELETE FROM {self.db.q(info.name)} WHERE {where}"
            self._sql_cache[ck] = sql
        return sql
