"""The staging store: mirror tables, the change journal, checkpoints and the replication status.

Any SQLAlchemy URL; SQLite (a file under the state directory) by default, PostgreSQL supported.

Why the apply path looks the way it does
----------------------------------------
*Exactly once.* A batch of changes and the source position it reaches commit in one staging
transaction (:meth:`ApplyTxn.commit` writes the checkpoint row in the same transaction). The
capture source confirms that position to the ERP only after the commit returned. A source
transaction is never split across two staging commits: a transaction larger than the batch is
*flushed* in chunks (so memory stays bounded) but committed only once its source commit arrived.
On SQLite, where a write transaction locks the whole database, those chunks are parked in spill
tables in short transactions of their own and moved into the mirrors by the commit (see
:class:`ApplyTxn`). After a crash, staging holds whole source transactions up to the checkpoint,
and capture resumes right after it.

*Batches, not round trips.* Within a staging transaction, pending changes are coalesced per row
key (the last image wins; a partial image — unchanged TOAST columns left out — is merged onto the
one before it) and written with ``executemany`` per (table, column set). Changes to different
keys commute, so the coalesced writes reach the same final state as applying one by one.

*Values.* Capture sources hand over Python values (ints, Decimals, datetimes, UUIDs, dicts,
lists, bytes). On PostgreSQL staging they keep their types; on SQLite, numerics and temporal
values are stored as text in ISO/decimal form (never as REAL, which would round) and JSON and
arrays as JSON text.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.config.core import redact_url
from replicator.db import connect_error, make_engine, one_line
from replicator.errors import AccessError, SyncError

log = structlog.get_logger(__name__)

SYSTEM_TABLES = (
    "sync_checkpoints",
    "sync_journal",
    "sync_cursors",
    "sync_tables",
)

_BUILTIN_OID_LIMIT = 16384
_COPY_THRESHOLD = 500  # rows in one group from which PostgreSQL staging uses COPY  # FirstNormalObjectId: types below are built into PostgreSQL


def _json_default(v: Any) -> Any:
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, dt.timedelta):
        return str(v)
    return str(v)


def to_json(v: Any) -> str:
    return json.dumps(v, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def _key_json(k: tuple[Any, ...] | None) -> str | None:
    """A row key as JSON text; ints and plain strings without a JSON encoder round trip."""
    if k is None:
        return None
    if len(k) == 1 and type(k[0]) is int:
        return f"[{k[0]}]"
    return to_json(list(k))


key_json = _key_json  # public: the journal's key text, for readers of the journal


def _category(col: Column) -> str:
    """A coarse storage category from the source type name."""
    t = col.type_name.lower()
    if t.endswith("[]"):
        return "array"
    base = t.split("(")[0].strip()
    if base in (
        "smallint",
        "integer",
        "bigint",
        "int2",
        "int4",
        "int8",
        "smallserial",
        "serial",
        "bigserial",
        "int",
        "tinyint",
        "mediumint",
    ):
        return "int"
    if base in ("boolean", "bool"):
        return "bool"
    if base in ("real", "double precision", "float4", "float8", "float", "double"):
        return "float"
    if base in ("bytea", "blob", "longblob", "mediumblob", "varbinary", "binary"):
        return "bytes"
    if base in ("json", "jsonb"):
        return "json"
    return "text"


column_category = _category  # public: int, bool, float, bytes, json, array or text


def _sqlite_value(v: Any) -> Any:
    if v is None or isinstance(v, (int, float, str, bytes)):
        return v  # bool is an int
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (dict, list, tuple)):
        return to_json(v)
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return str(v)


scalar_text = _sqlite_value  # public: numerics, temporals and UUIDs as text, as SQLite keeps them


def _iso_space(v: Any) -> Any:
    return v.isoformat(sep=" ") if isinstance(v, dt.datetime) else _sqlite_value(v)


def _iso(v: Any) -> Any:
    return v.isoformat() if isinstance(v, (dt.date, dt.time)) else _sqlite_value(v)


def _decimal_text(v: Any) -> Any:
    return str(v) if isinstance(v, decimal.Decimal) else _sqlite_value(v)


def _sqlite_converter(col: Column | None) -> Any:
    """The value converter for one column on SQLite staging; None when values go as they are.

    Every specialised converter falls back to :func:`_sqlite_value` for an unexpected value
    type, so the stored form is always the same as the generic path would give.
    """
    if col is None:
        return _sqlite_value
    cat = _category(col)
    if cat in ("int", "float", "bytes"):
        return None
    base = col.type_name.lower().split("(")[0].strip()
    if base in ("text", "character varying", "character", "varchar", "char", "bpchar", "name"):
        return None  # psycopg hands these over as str already
    if base.startswith("timestamp"):
        return _iso_space
    if base in ("date", "time", "time without time zone", "time with time zone"):
        return _iso
    if base in ("numeric", "decimal"):
        return _decimal_text
    return _sqlite_value


def _sqlite_type(col: Column) -> str:
    return {"int": "INTEGER", "bool": "INTEGER", "float": "REAL", "bytes": "BLOB"}.get(
        _category(col), "TEXT"
    )


def _pg_type(col: Column) -> str:
    # Built-in types are recreated as they are; user-defined ones (enums, domains) as text.
    if col.type_oid and col.type_oid >= _BUILTIN_OID_LIMIT:
        return "text"
    return col.type_name or "text"


@dataclass(frozen=True, slots=True)
class MirrorInfo:
    """A mirror table and how to write into it."""

    source_table: str
    name: str
    schema: TableSchema
    journaled: bool = True  # a shadow mirror (online re-copy) is not: the live mirror is


class _Pending:
    """Coalesced pending changes of one table inside an open staging transaction."""

    __slots__ = ("deletes", "upserts")

    def __init__(self) -> None:
        # key tuple -> (values dict, partial?) for upserts; key tuple -> position for deletes
        self.upserts: dict[tuple[Any, ...], tuple[dict[str, Any], bool, str]] = {}
        self.deletes: dict[tuple[Any, ...], str] = {}

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


def _upsert_groups(
    pend: _Pending,
) -> dict[tuple[str, ...], list[tuple[dict[str, Any], tuple[Any, ...], str]]]:
    """Pending upserts grouped by column set (full images, and each shape of partial image):
    ``(values, key, position)`` per row, one ``executemany`` or ``INSERT … SELECT`` a group."""
    groups: dict[tuple[str, ...], list[tuple[dict[str, Any], tuple[Any, ...], str]]] = {}
    for k, (values, _partial, pos) in pend.upserts.items():
        groups.setdefault(tuple(values.keys()), []).append((values, k, pos))
    return groups


class _Spill:
    """Chunks of one large source transaction, parked until its commit (SQLite staging).

    Each mirror gets a spill table ``_sync_spill__<mirror>``: the mirror's columns plus a
    sequence number, the change's position and its journal key. A chunk is written in a short
    transaction of its own as *segments* — runs of rows of one table, one operation and one
    column set, in the order the direct path writes them. :meth:`materialize` replays the
    segments in order into the mirrors and the journal, one ``DELETE … IN (SELECT …)`` or
    ``INSERT … SELECT … ON CONFLICT`` each, inside the transaction that commits the checkpoint,
    then drops the spill tables. Values pass through the same converters and column affinities
    as on the direct path, so the mirror ends up byte for byte the same.

    One capture source writes a mirror at a time, so a spill table belongs to one transaction:
    the first chunk of a large transaction recreates it, and a spill left behind by a crash or
    a rollback is never read.
    """

    def __init__(self, store: StagingStore) -> None:
        self.store = store
        self.tables: dict[str, str] = {}  # mirror name -> its spill table, made in this txn
        # (mirror, op, columns, first seq, last seq)
        self.segments: list[tuple[MirrorInfo, str, tuple[str, ...], int, int]] = []
        self.seq = 0

    def _table(self, conn: sa.Connection, info: MirrorInfo) -> str:
        name = self.tables.get(info.name)
        if name is None:
            store = self.store
            name = f"_sync_spill__{info.name}"
            cols = ", ".join(store._col_ddl(c) for c in info.schema.columns)
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {store.q(name)}")
            conn.exec_driver_sql(
                f"CREATE TABLE {store.q(name)} (_sync_seq INTEGER PRIMARY KEY, "
                f"_sync_pos TEXT NOT NULL, _sync_jkey TEXT, {cols})"
            )
            self.tables[info.name] = name
        return name

    def _segment(
        self,
        cur: Any,
        conn: sa.Connection,
        info: MirrorInfo,
        op: str,
        cols: tuple[str, ...],
        rows: list[tuple[Any, ...]],
    ) -> None:
        """Append ``rows`` (position, journal key, column values…) as one segment."""
        q = self.store.q
        spill = self._table(conn, info)
        first = self.seq + 1
        ph = ", ".join(["?"] * (len(cols) + 3))
        cur.executemany(
            f"INSERT INTO {q(spill)} (_sync_seq, _sync_pos, _sync_jkey, "
            f"{', '.join(q(c) for c in cols)}) VALUES ({ph})",
            [(first + i, *row) for i, row in enumerate(rows)],
        )
        self.seq += len(rows)
        self.segments.append((info, op, cols, first, self.seq))

    def write(self, pending: dict[str, _Pending]) -> None:
        store = self.store
        with store.engine.begin() as conn:
            dbapi = conn.connection.driver_connection
            assert dbapi is not None
            cur = dbapi.cursor()
            try:
                for table, pend in pending.items():
                    info = store._mirrors[table]
                    if pend.deletes:
                        self._segment(
                            cur,
                            conn,
                            info,
                            "D",
                            info.schema.key,
                            [(pos, _key_json(k), *k) for k, pos in pend.deletes.items()],
                        )
                    for cols, rows in _upsert_groups(pend).items():
                        conv = store.converter(info, cols)
                        self._segment(
                            cur,
                            conn,
                            info,
                            "U",
                            cols,
                            [(pos, _key_json(k), *conv(values)) for values, k, pos in rows],
                        )
            finally:
                cur.close()

    def materialize(self, txn: ApplyTxn, conn: sa.Connection) -> None:
        """Move every spilled chunk into the mirrors and the journal, inside ``conn``'s
        transaction; drop the spill tables with it."""
        store = self.store
        q = store.q
        now = store._now()
        for info, op, cols, first, last in self.segments:
            spill = q(self.tables[info.name])
            collist = ", ".join(q(c) for c in cols)
            rng = f"FROM {spill} WHERE _sync_seq BETWEEN ? AND ?"
            if op == "D":
                lhs = collist if len(cols) == 1 else f"({collist})"
                conn.exec_driver_sql(
                    f"DELETE FROM {q(info.name)} WHERE {lhs} IN (SELECT {collist} {rng})",
                    (first, last),
                )
            else:
                conn.exec_driver_sql(
                    f"INSERT INTO {q(info.name)} ({collist}) SELECT {collist} {rng} "
                    f"ORDER BY _sync_seq {store.conflict_sql(info, cols)}",
                    (first, last),
                )
            if store.journal_enabled and info.journaled:
                conn.exec_driver_sql(
                    "INSERT INTO sync_journal (source, table_name, op, row_key, position, at) "
                    f"SELECT ?, ?, ?, _sync_jkey, _sync_pos, ? {rng} ORDER BY _sync_seq",
                    (txn.source, info.source_table, op, now, first, last),
                )
        for name in self.tables.values():
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {q(name)}")


class StagingStore:
    """Mirror tables + change journal + checkpoints in one SQLAlchemy database."""

    def __init__(self, url: str, *, journal: bool = True, role: str = "staging") -> None:
        self.url = url
        self.engine = make_engine(url, role)
        self.dialect = self.engine.dialect.name
        self.journal_enabled = journal
        self._mirrors: dict[str, MirrorInfo] = {}
        self._sql_cache: dict[tuple[Any, ...], str] = {}
        self._ready = False
        self._checkpointer: tuple[Any, Any] | None = None

    # ------------------------------------------------------------------ set-up
    def q(self, ident: str) -> str:
        """Quote an identifier for the staging dialect."""
        return self.engine.dialect.identifier_preparer.quote_identifier(ident)

    def setup(self) -> None:
        """Create the system tables and the ``replication_status`` view (idempotent)."""
        if self._ready:
            return
        text = "TEXT"
        ts = "TIMESTAMP WITH TIME ZONE" if self.dialect == "postgresql" else "TEXT"
        ident = (
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
            if self.dialect == "postgresql"
            else "INTEGER PRIMARY KEY AUTOINCREMENT"
        )
        big = "BIGINT"
        dbl = "DOUBLE PRECISION" if self.dialect == "postgresql" else "REAL"
        ddl = [
            f"""CREATE TABLE IF NOT EXISTS sync_checkpoints (
                source {text} PRIMARY KEY,
                slot {text},
                position {text} NOT NULL,
                state {text} NOT NULL,
                extra {text} NOT NULL DEFAULT '{{}}',
                updated_at {ts} NOT NULL,
                last_replication_at {ts},
                source_commit_at {ts},
                heartbeat_at {ts},
                heartbeat_sent_at {ts},
                lag_seconds {dbl},
                lag_bytes {big},
                server_position {text},
                changes_applied {big} NOT NULL DEFAULT 0
            )""",
            f"""CREATE TABLE IF NOT EXISTS sync_journal (
                id {ident},
                source {text} NOT NULL,
                table_name {text} NOT NULL,
                op {text} NOT NULL,
                row_key {text},
                position {text} NOT NULL,
                at {ts} NOT NULL
            )""",
            f"""CREATE TABLE IF NOT EXISTS sync_cursors (
                consumer {text} PRIMARY KEY,
                journal_id {big} NOT NULL,
                updated_at {ts} NOT NULL
            )""",
            f"""CREATE TABLE IF NOT EXISTS sync_tables (
                source_table {text} PRIMARY KEY,
                mirror_name {text} NOT NULL,
                definition {text} NOT NULL,
                updated_at {ts} NOT NULL
            )""",
            f"""CREATE TABLE IF NOT EXISTS sync_recopy_requests (
                source {text} NOT NULL,
                source_table {text} NOT NULL,
                requested_at {ts} NOT NULL,
                PRIMARY KEY (source, source_table)
            )""",
            f"""CREATE TABLE IF NOT EXISTS sync_services (
                name {text} PRIMARY KEY,
                last_run_at {ts},
                last_ok {text},
                last_result {text},
                next_run_at {ts},
                progress {text},
                breaker_open {text},
                failures {big} NOT NULL DEFAULT 0,
                updated_at {ts} NOT NULL
            )""",
            f"""CREATE TABLE IF NOT EXISTS sync_daemon (
                name {text} PRIMARY KEY,
                pid {big} NOT NULL,
                host {text} NOT NULL,
                started_at {ts} NOT NULL,
                alive_at {ts} NOT NULL,
                alive_interval {dbl} NOT NULL,
                stopped_at {ts},
                exit_code {big}
            )""",
            "CREATE INDEX IF NOT EXISTS sync_journal_table ON sync_journal (table_name, id)",
        ]
        view = """CREATE VIEW replication_status AS
            SELECT source, slot, last_replication_at, position AS confirmed_position,
                   lag_seconds, lag_bytes, heartbeat_at, state, changes_applied, updated_at
            FROM sync_checkpoints"""
        self._private_sqlite_file()
        try:  # opening first: its error names the store; the DDL's would not
            self.engine.connect().close()
        except sa.exc.DBAPIError as exc:
            raise self._open_error(exc) from None
        with self.engine.begin() as conn:
            for stmt in ddl:
                conn.exec_driver_sql(stmt)
            if self.dialect == "postgresql":
                conn.exec_driver_sql(view.replace("CREATE VIEW", "CREATE OR REPLACE VIEW"))
            else:
                conn.exec_driver_sql(view.replace("CREATE VIEW", "CREATE VIEW IF NOT EXISTS"))
        self._load_mirrors()
        self._ready = True

    def _private_sqlite_file(self) -> None:
        """The staging file holds customer payloads: owner-only (0600), whatever the umask.
        SQLite gives its -wal and -shm files the database file's permissions."""
        if self.dialect != "sqlite":
            return
        path = sa.engine.make_url(self.url).database
        if not path or path == ":memory:" or path.startswith("file:"):
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return  # the connect below fails and names the path
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except OSError as exc:  # someone else's file: say so, the store still works
            log.warning("staging_file_not_private", path=path, error=str(exc))
        finally:
            os.close(fd)

    def _open_error(self, exc: sa.exc.DBAPIError) -> SyncError:
        """The one-line error for a staging store that cannot be opened, naming where it is."""
        if self.dialect == "sqlite":
            path = sa.engine.make_url(self.url).database or ":memory:"
            return AccessError(
                f"staging store {path}: cannot open it ({one_line(exc.orig or exc)}): the folder must "
                "exist and be writable by this user (staging.url, or daemon.state_dir)"
            )
        return connect_error(
            "cannot reach the staging store", redact_url(self.url), exc.orig or exc
        )

    def _load_mirrors(self) -> None:
        with self.engine.connect() as conn:
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
            self._mirrors[source_table] = MirrorInfo(source_table, mirror_name, schema)

    @staticmethod
    def mirror_name(table: str) -> str:
        schema, _, name = table.partition(".")
        return name if schema == "public" else f"{schema}__{name}"

    def mirror(self, table: str) -> MirrorInfo | None:
        return self._mirrors.get(table)

    def mirrors(self) -> list[MirrorInfo]:
        return list(self._mirrors.values())

    def _col_ddl(self, col: Column) -> str:
        typ = _pg_type(col) if self.dialect == "postgresql" else _sqlite_type(col)
        return f"{self.q(col.name)} {typ}"

    def _write_definition(self, conn: sa.Connection, name: str, schema: TableSchema) -> None:
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
        now = self._now()
        updated = conn.exec_driver_sql(
            "UPDATE sync_tables SET mirror_name = %s, definition = %s, updated_at = %s "
            "WHERE source_table = %s" % ((self._ph,) * 4),
            (name, definition, now, schema.qualified),
        ).rowcount
        if not updated:
            conn.exec_driver_sql(
                "INSERT INTO sync_tables (source_table, mirror_name, definition, updated_at) "
                "VALUES (%s, %s, %s, %s)" % ((self._ph,) * 4),
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
        info = self._mirrors[schema.qualified]
        q = self.q
        table = q(info.name)
        for before, after in renamed.items():
            conn.exec_driver_sql(f"ALTER TABLE {table} RENAME COLUMN {q(before)} TO {q(after)}")
        for gone in dropped:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {q(gone)}")
        have = {renamed.get(c.name, c.name) for c in info.schema.columns} - set(dropped)
        for col in schema.columns:
            if col.name not in have:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {self._col_ddl(col)}")
        if self.dialect == "postgresql":
            for name in retyped:
                retype = schema.column(name)
                assert retype is not None
                typ = _pg_type(retype)
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
        self._write_definition(conn, info.name, schema)
        altered = MirrorInfo(schema.qualified, info.name, schema)
        self._mirrors[schema.qualified] = altered
        self._sql_cache.clear()
        return altered

    def ensure_mirror(self, schema: TableSchema, conn: sa.Connection | None = None) -> MirrorInfo:
        """Create the mirror of a source table, or add columns the source gained (columns it no
        longer has stay until :meth:`alter_mirror` follows the change that removed them)."""
        if conn is None:
            with self.engine.begin() as c:
                return self.ensure_mirror(schema, c)
        name = self.mirror_name(schema.qualified)
        known = self._mirrors.get(schema.qualified)
        if known is None:
            cols = ", ".join(self._col_ddl(c) for c in schema.columns)
            pk = ", ".join(self.q(k) for k in schema.key)
            conn.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {self.q(name)} ({cols}, PRIMARY KEY ({pk}))"
            )
            merged = schema
        else:
            have = {c.name for c in known.schema.columns}
            added = [c for c in schema.columns if c.name not in have]
            for col in added:
                conn.exec_driver_sql(f"ALTER TABLE {self.q(name)} ADD COLUMN {self._col_ddl(col)}")
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
        self._write_definition(conn, name, merged)
        info = MirrorInfo(schema.qualified, name, merged)
        self._mirrors[schema.qualified] = info
        self._sql_cache.clear()
        return info

    def backfill_column(self, conn: sa.Connection, table: str, column: str, value: Any) -> None:
        """Set ``column`` of every row of a mirror (rows that predate an added column)."""
        info = self._mirrors[table]
        col = info.schema.column(column)
        v = _sqlite_value(value) if self.dialect == "sqlite" else self._pg_param(col, value)
        conn.exec_driver_sql(f"UPDATE {self.q(info.name)} SET {self.q(column)} = {self._ph}", (v,))

    # ------------------------------------------------------------------ online re-copy
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
        self.setup()
        name = f"_sync_recopy__{self.mirror_name(schema.qualified)}"
        cols = ", ".join(self._col_ddl(c) for c in schema.columns)
        pk = ", ".join(self.q(k) for k in schema.key)
        with contextlib.ExitStack() as stack:
            if conn is None:
                conn = stack.enter_context(self.engine.begin())
            if fresh:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.q(name)}")
            conn.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {self.q(name)} ({cols}, PRIMARY KEY ({pk}))"
            )
        info = MirrorInfo(self.shadow_of(schema.qualified), name, schema, journaled=False)
        self._mirrors[info.source_table] = info
        self._sql_cache.clear()
        return info

    def swap_shadow(self, conn: sa.Connection, table: str) -> None:
        """Put the completed shadow of ``table`` in place of its mirror, in ``conn``'s transaction."""
        shadow = self._mirrors.pop(self.shadow_of(table))
        live = self._mirrors[table]
        q = self.q
        conn.exec_driver_sql(f"DROP TABLE {q(live.name)}")
        conn.exec_driver_sql(f"ALTER TABLE {q(shadow.name)} RENAME TO {q(live.name)}")
        if self.dialect == "postgresql":  # the primary key's index keeps the shadow's name
            conn.exec_driver_sql(
                f"ALTER INDEX IF EXISTS {q(shadow.name + '_pkey')} RENAME TO {q(live.name + '_pkey')}"
            )
        self._write_definition(conn, live.name, shadow.schema)
        self._mirrors[table] = MirrorInfo(table, live.name, shadow.schema)
        self._sql_cache.clear()

    def request_recopy(self, source: str, table: str) -> None:
        """``sync-daemon resync --table``: ask the capture of ``source`` to copy ``table`` again,
        online; the daemon takes the request with its next commit (or at its next start)."""
        self.setup()
        p = self._ph
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"DELETE FROM sync_recopy_requests WHERE source = {p} AND source_table = {p}",
                (source, table),
            )
            conn.exec_driver_sql(
                "INSERT INTO sync_recopy_requests (source, source_table, requested_at) "
                f"VALUES ({p}, {p}, {p})",
                (source, table, self._now()),
            )

    def recopy_requests(self, source: str) -> list[str]:
        """Tables whose re-copy was asked for and not yet taken up."""
        self.setup()
        with self.engine.connect() as conn:
            return [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT source_table FROM sync_recopy_requests WHERE source = "
                    f"{self._ph} ORDER BY requested_at",
                    (source,),
                )
            ]

    def take_recopy_request(self, conn: sa.Connection, source: str, table: str) -> None:
        """A request taken up, in the transaction that records the copy in the checkpoint."""
        p = self._ph
        conn.exec_driver_sql(
            f"DELETE FROM sync_recopy_requests WHERE source = {p} AND source_table = {p}",
            (source, table),
        )

    def journal_event(
        self, conn: sa.Connection, source: str, table: str, op: str, position: str
    ) -> None:
        """A table-level journal entry (no row key): a truncate, a re-copy or a schema change.
        Consumers treat an entry without a key as "anything in this table may have changed"."""
        if not self.journal_enabled:
            return
        p = self._ph
        conn.exec_driver_sql(
            "INSERT INTO sync_journal (source, table_name, op, row_key, position, at) "
            f"VALUES ({p}, {p}, {p}, NULL, {p}, {p})",
            (source, table, op, position, self._now()),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def _ph(self) -> str:
        return "?" if self.dialect == "sqlite" else "%s"

    def _now(self) -> Any:
        now = dt.datetime.now(dt.UTC)
        return now.isoformat(sep=" ") if self.dialect == "sqlite" else now

    def to_storage(self, v: Any) -> Any:
        """A value for a system-table column (PostgreSQL takes Python values as they are)."""
        return _sqlite_value(v) if self.dialect == "sqlite" else v

    def _pg_param(self, col: Column | None, v: Any) -> Any:
        if v is None or col is None:
            return v
        cat = _category(col)
        if cat == "json":
            from psycopg.types.json import Json, Jsonb

            return Jsonb(v) if col.type_name.lower() == "jsonb" else Json(v)
        if col.type_oid and col.type_oid >= _BUILTIN_OID_LIMIT:
            return v if isinstance(v, str) else to_json(v)
        return v

    def converter(self, info: MirrorInfo, cols: Sequence[str]) -> Any:
        """A function turning a row of Python values into driver parameters for ``cols``."""
        if self.dialect == "sqlite":
            # Only columns whose values need converting pay for it (ints, text, floats, blobs
            # go to SQLite as they are), with a converter chosen once per column type.
            conv = [(c, _sqlite_converter(info.schema.column(c))) for c in cols]
            if all(f is None for _, f in conv):
                return lambda values: tuple([values[c] for c in cols])
            return lambda values: tuple(
                [values[c] if f is None or values[c] is None else f(values[c]) for c, f in conv]
            )
        schema = info.schema
        typed = [schema.column(c) for c in cols]
        plain = all(
            c is not None and _category(c) != "json" and (c.type_oid or 0) < _BUILTIN_OID_LIMIT
            for c in typed
        )
        if plain:
            return lambda values: tuple(values[c] for c in cols)
        pairs = list(zip(cols, typed, strict=True))
        return lambda values: tuple(self._pg_param(t, values[c]) for c, t in pairs)

    def upsert_sql(self, info: MirrorInfo, cols: tuple[str, ...]) -> str:
        ck = ("upsert", info.name, cols)
        sql = self._sql_cache.get(ck)
        if sql is None:
            collist = ", ".join(self.q(c) for c in cols)
            ph = ", ".join([self._ph] * len(cols))
            sql = (
                f"INSERT INTO {self.q(info.name)} ({collist}) VALUES ({ph}) "
                f"{self.conflict_sql(info, cols)}"
            )
            self._sql_cache[ck] = sql
        return sql

    def conflict_sql(self, info: MirrorInfo, cols: Sequence[str]) -> str:
        """The ``ON CONFLICT`` clause of an upsert of ``cols`` into a mirror."""
        q = self.q
        key = info.schema.key
        sets = [f"{q(c)} = excluded.{q(c)}" for c in cols if c not in key]
        action = f"DO UPDATE SET {', '.join(sets)}" if sets else "DO NOTHING"
        return f"ON CONFLICT ({', '.join(q(k) for k in key)}) {action}"

    def delete_sql(self, info: MirrorInfo) -> str:
        ck = ("delete", info.name)
        sql = self._sql_cache.get(ck)
        if sql is None:
            where = " AND ".join(f"{self.q(k)} = {self._ph}" for k in info.schema.key)
            sql = f"DELETE FROM {self.q(info.name)} WHERE {where}"
            self._sql_cache[ck] = sql
        return sql

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, source: str) -> Checkpoint | None:
        self.setup()
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(
                f"SELECT position, state, extra FROM sync_checkpoints WHERE source = {self._ph}",
                (source,),
            ).fetchone()
        if row is None:
            return None
        return Checkpoint(source=source, position=row[0], state=row[1], extra=json.loads(row[2]))

    def write_checkpoint(
        self,
        conn: sa.Connection,
        cp: Checkpoint,
        *,
        slot: str | None = None,
        changes: int = 0,
        source_commit_at: dt.datetime | None = None,
        replicated: bool = True,
    ) -> None:
        """Upsert the checkpoint row inside the caller's transaction."""
        now = self._now()
        commit_at = self.to_storage(source_commit_at) if source_commit_at else None
        p = self._ph
        updated = conn.exec_driver_sql(
            f"UPDATE sync_checkpoints SET position = {p}, state = {p}, extra = {p}, "
            f"updated_at = {p}, slot = COALESCE({p}, slot), "
            f"changes_applied = changes_applied + {p}, "
            f"last_replication_at = CASE WHEN {p} THEN {p} ELSE last_replication_at END, "
            f"source_commit_at = COALESCE({p}, source_commit_at) WHERE source = {p}",
            (
                cp.position,
                cp.state,
                to_json(cp.extra),
                now,
                slot,
                changes,
                replicated,
                now,
                commit_at,
                cp.source,
            ),
        ).rowcount
        if not updated:
            conn.exec_driver_sql(
                "INSERT INTO sync_checkpoints (source, slot, position, state, extra, updated_at, "
                f"last_replication_at, source_commit_at, changes_applied) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
                (
                    cp.source,
                    slot,
                    cp.position,
                    cp.state,
                    to_json(cp.extra),
                    now,
                    now if replicated else None,
                    commit_at,
                    changes,
                ),
            )

    def record_heartbeat(
        self,
        source: str,
        *,
        sent_at: dt.datetime,
        lag_seconds: float | None,
        lag_bytes: int | None = None,
        server_position: str | None = None,
        conn: sa.Connection | None = None,
    ) -> None:
        """Record that a heartbeat came through the stream (or was written, in trigger mode)."""
        if conn is None:
            with self.engine.begin() as c:
                self.record_heartbeat(
                    source,
                    sent_at=sent_at,
                    lag_seconds=lag_seconds,
                    lag_bytes=lag_bytes,
                    server_position=server_position,
                    conn=c,
                )
            return
        p = self._ph
        conn.exec_driver_sql(
            f"UPDATE sync_checkpoints SET heartbeat_at = {p}, heartbeat_sent_at = {p}, "
            f"lag_seconds = COALESCE({p}, lag_seconds), lag_bytes = COALESCE({p}, lag_bytes), "
            f"server_position = COALESCE({p}, server_position) WHERE source = {p}",
            (
                self._now(),
                self.to_storage(sent_at),
                lag_seconds,
                lag_bytes,
                server_position,
                source,
            ),
        )

    def save_service(self, st: Any) -> None:
        """Persist what a service last did, so ``sync-daemon status`` (another process) sees it."""
        p = self._ph
        values = (
            self.to_storage(st.last_run_at) if st.last_run_at else None,
            None if st.last_ok is None else ("yes" if st.last_ok else "no"),
            st.last_result,
            self.to_storage(st.next_run_at) if st.next_run_at else None,
            st.progress,
            "yes" if st.breaker_open else "no",
            st.failures,
            self._now(),
            st.name,
        )
        with self.engine.begin() as conn:
            n = conn.exec_driver_sql(
                f"UPDATE sync_services SET last_run_at = {p}, last_ok = {p}, last_result = {p}, "
                f"next_run_at = {p}, progress = {p}, breaker_open = {p}, failures = {p}, "
                f"updated_at = {p} WHERE name = {p}",
                values,
            ).rowcount
            if not n:
                conn.exec_driver_sql(
                    "INSERT INTO sync_services (last_run_at, last_ok, last_result, next_run_at, "
                    "progress, breaker_open, failures, updated_at, name) "
                    f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
                    values,
                )

    def mark_alive(self, pid: int, host: str, started_at: dt.datetime, interval: float) -> None:
        """The daemon's liveness mark: written at start and every ``interval`` s by its main loop.

        The whole row is written each time, so a second daemon that starts on the same staging
        and exits again (it cannot take the source) is overwritten by the one that runs.
        """
        p = self._ph
        values = (pid, host, self.to_storage(started_at), self._now(), interval, "daemon")
        with self.engine.begin() as conn:
            n = conn.exec_driver_sql(
                f"UPDATE sync_daemon SET pid = {p}, host = {p}, started_at = {p}, alive_at = {p}, "
                f"alive_interval = {p}, stopped_at = NULL, exit_code = NULL WHERE name = {p}",
                values,
            ).rowcount
            if not n:
                conn.exec_driver_sql(
                    "INSERT INTO sync_daemon (pid, host, started_at, alive_at, alive_interval, "
                    f"name) VALUES ({p}, {p}, {p}, {p}, {p}, {p})",
                    values,
                )

    def mark_stopped(self, pid: int, host: str, exit_code: int) -> None:
        """The daemon stops (only its own mark: a failed second daemon leaves the first's)."""
        p = self._ph
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE sync_daemon SET stopped_at = {p}, exit_code = {p} "
                f"WHERE name = 'daemon' AND pid = {p} AND host = {p}",
                (self._now(), exit_code, pid, host),
            )

    def load_liveness(self) -> dict[str, Any] | None:
        """The daemon's liveness row (timestamps as aware datetimes), or None if it never ran."""
        self.setup()
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT * FROM sync_daemon WHERE name = 'daemon'").first()
        if row is None:
            return None
        d = dict(row._mapping)
        for k in ("started_at", "alive_at", "stopped_at"):
            if isinstance(d[k], str):
                d[k] = dt.datetime.fromisoformat(d[k])
            if d[k] is not None and d[k].tzinfo is None:
                d[k] = d[k].replace(tzinfo=dt.UTC)
        return d

    def load_services(self) -> list[dict[str, Any]]:
        self.setup()
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT * FROM sync_services ORDER BY name")
            out = []
            for r in rows:
                d = dict(r._mapping)
                d["last_ok"] = None if d["last_ok"] is None else d["last_ok"] == "yes"
                d["breaker_open"] = d["breaker_open"] == "yes"
                for k in ("last_run_at", "next_run_at", "updated_at"):
                    if isinstance(d[k], str):
                        d[k] = dt.datetime.fromisoformat(d[k])
                out.append(d)
            return out

    def replication_status(self) -> list[dict[str, Any]]:
        self.setup()
        with self.engine.connect() as conn:
            res = conn.exec_driver_sql("SELECT * FROM replication_status ORDER BY source")
            return [dict(r._mapping) for r in res]

    # ------------------------------------------------------------------ apply
    @contextmanager
    def transaction(self, source: str = "") -> Iterator[ApplyTxn]:
        """An apply transaction; rolled back unless :meth:`ApplyTxn.commit` was called."""
        self.setup()
        txn = ApplyTxn(self, source)
        try:
            yield txn
        finally:
            txn.close()

    def begin(self, source: str = "", *, spill: bool = False) -> ApplyTxn:
        """An apply transaction; ``spill``: a flush before it is open parks the chunk in a spill
        table (SQLite; see :class:`ApplyTxn`), for a source whose transactions may stay open
        across cycles of the daemon's loop."""
        self.setup()
        return ApplyTxn(self, source, spill=spill)

    def reset_source(self, source: str, tables: Sequence[str]) -> None:
        """Forget a source: empty its mirrors and drop its checkpoint (resync, re-snapshot)."""
        self.setup()
        with self.engine.begin() as conn:
            for t in tables:
                info = self._mirrors.get(t)
                if info is not None:
                    conn.exec_driver_sql(f"DELETE FROM {self.q(info.name)}")
            conn.exec_driver_sql(
                f"DELETE FROM sync_checkpoints WHERE source = {self._ph}", (source,)
            )

    # ------------------------------------------------------------------ journal
    def journal_read(
        self, consumer: str, *, tables: Sequence[str] | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Journal entries after ``consumer``'s cursor (oldest first)."""
        self.setup()
        p = self._ph
        with self.engine.connect() as conn:
            after = self._cursor(conn, consumer)
            sql = f"SELECT id, source, table_name, op, row_key, position, at FROM sync_journal WHERE id > {p}"
            params: list[Any] = [after]
            if tables:
                sql += f" AND table_name IN ({', '.join([p] * len(tables))})"
                params.extend(tables)
            sql += f" ORDER BY id LIMIT {int(limit)}"
            rows = conn.exec_driver_sql(sql, tuple(params)).fetchall()
        return [
            {
                "id": r[0],
                "source": r[1],
                "table": r[2],
                "op": r[3],
                "key": json.loads(r[4]) if r[4] else None,
                "key_text": r[4],
                "position": r[5],
                "at": r[6],
            }
            for r in rows
        ]

    def _cursor(self, conn: sa.Connection, consumer: str) -> int:
        row = conn.exec_driver_sql(
            f"SELECT journal_id FROM sync_cursors WHERE consumer = {self._ph}", (consumer,)
        ).fetchone()
        return int(row[0]) if row else 0

    def journal_commit(self, consumer: str, journal_id: int) -> None:
        """Move ``consumer``'s cursor (after its work for entries up to ``journal_id`` is done)."""
        p = self._ph
        with self.engine.begin() as conn:
            n = conn.exec_driver_sql(
                f"UPDATE sync_cursors SET journal_id = {p}, updated_at = {p} WHERE consumer = {p}",
                (journal_id, self._now(), consumer),
            ).rowcount
            if not n:
                conn.exec_driver_sql(
                    f"INSERT INTO sync_cursors (consumer, journal_id, updated_at) VALUES ({p}, {p}, {p})",
                    (consumer, journal_id, self._now()),
                )

    def journal_cursors(self) -> list[str]:
        """The names of the journal's consumers (pushers, the stream sink)."""
        self.setup()
        with self.engine.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT consumer FROM sync_cursors")]

    def journal_backlog(self, consumer: str) -> tuple[int, Any]:
        """How many journal entries wait for ``consumer``, and when the oldest was committed."""
        self.setup()
        p = self._ph
        with self.engine.connect() as conn:
            after = self._cursor(conn, consumer)
            n, oldest = conn.exec_driver_sql(
                f"SELECT COUNT(*), MIN(at) FROM sync_journal WHERE id > {p}", (after,)
            ).one()
        return int(n), oldest

    def refresh_mirrors(self) -> None:
        """Re-read the mirror definitions (another process may have added tables or columns)."""
        self.setup()
        self._load_mirrors()
        self._sql_cache.clear()

    def rows_by_key(self, table: str, keys: Sequence[Sequence[Any]]) -> dict[str, dict[str, Any]]:
        """The current mirror rows of ``keys`` (:func:`key_json` of the key -> row as a dict);
        absent keys are rows deleted since."""
        info = self._mirrors.get(table)
        if info is None or not keys:
            return {}
        q, p = self.q, self._ph
        names = [c.name for c in info.schema.columns]
        keycols = info.schema.key
        cols = ", ".join(q(c) for c in names)
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                row_ph = "(" + ", ".join([p] * len(keycols)) + ")"
                where = (
                    f"({', '.join(q(k) for k in keycols)}) IN "
                    f"(VALUES {', '.join([row_ph] * len(chunk))})"
                )
                params = tuple(v for k in chunk for v in k)
                for r in conn.exec_driver_sql(
                    f"SELECT {cols} FROM {q(info.name)} WHERE {where}", params
                ):
                    row = dict(zip(names, r, strict=True))
                    out[str(_key_json(tuple(row[k] for k in keycols)))] = row
        return out

    def journal_prune(self, keep_seconds: float) -> int:
        """Delete journal entries every consumer has read and that are older than ``keep_seconds``."""
        p = self._ph
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=keep_seconds)
        with self.engine.begin() as conn:
            low = conn.exec_driver_sql("SELECT MIN(journal_id) FROM sync_cursors").scalar()
            sql = f"DELETE FROM sync_journal WHERE at < {p}"
            params: list[Any] = [self.to_storage(cutoff)]
            if low is not None:
                sql += f" AND id <= {p}"
                params.append(low)
            return int(conn.exec_driver_sql(sql, tuple(params)).rowcount or 0)

    # ------------------------------------------------------------------ verification
    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """All rows of a mirror, ordered by key (tests and the fault suite compare with the source)."""
        info = self._mirrors.get(table)
        if info is None:
            self._load_mirrors()
            info = self._mirrors[table]
        cols = ", ".join(self.q(c.name) for c in info.schema.columns)
        order = ", ".join(self.q(k) for k in info.schema.key)
        with self.engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.exec_driver_sql(
                    f"SELECT {cols} FROM {self.q(info.name)} ORDER BY {order}"
                )
            ]

    def checksum(self, table: str) -> tuple[int, str]:
        h = hashlib.sha256()
        rows = self.rows(table)
        for r in rows:
            h.update(to_json([_sqlite_value(v) for v in r]).encode())
        return len(rows), h.hexdigest()

    def start_checkpointer(self, interval: float = 1.0) -> None:
        """SQLite: checkpoint the WAL from a thread of its own (the daemon calls this).

        By default SQLite checkpoints inside the commit that crosses 1000 WAL pages, in the
        committing (capture) thread; after a large source transaction that one commit then
        copies hundreds of megabytes back into the database and every change behind it waits.
        Here the apply path never checkpoints (``wal_autocheckpoint=0`` on its connections) and
        a background thread runs PASSIVE checkpoints, which never block writers or readers.
        """
        if self.dialect != "sqlite" or self._checkpointer is not None:
            return
        import sqlite3
        import threading

        path = self.engine.url.database
        if not path or path == ":memory:":
            return

        @sa.event.listens_for(self.engine, "connect")
        def _no_autocheckpoint(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")

        self.engine.dispose()  # connections made before now still checkpoint on commit
        stop = threading.Event()

        def run() -> None:
            conn = sqlite3.connect(path, timeout=5, check_same_thread=False)
            try:
                while not stop.wait(interval):
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    except sqlite3.Error as exc:
                        log.warning("wal_checkpoint_failed", error=str(exc))
            finally:
                conn.close()

        thread = threading.Thread(target=run, name="sqlite-checkpoint", daemon=True)
        thread.start()
        self._checkpointer = (stop, thread)

    def dispose(self) -> None:
        if self._checkpointer is not None:
            stop, thread = self._checkpointer
            stop.set()
            thread.join(5)
            self._checkpointer = None
        self.engine.dispose()


class ApplyTxn:
    """One staging transaction that changes are applied into.

    ``apply`` buffers and coalesces; ``flush`` writes what is pending (still invisible to
    readers of the mirrors); ``commit(checkpoint)`` flushes, writes the checkpoint and commits —
    all or nothing.

    The database transaction is opened lazily, at the first write that needs it. On SQLite a
    write transaction locks the whole database, so for the logical source (``spill=True``: its
    large source transactions outlive a cycle of the daemon's loop) a flush in the middle of a
    source transaction does not write into an open transaction: it *spills* the chunk into a
    spill table (see :class:`_Spill`) in a short transaction of its own, and the commit moves
    every spilled chunk into the mirrors, in order, inside the one transaction that also holds
    the checkpoint. Readers never see half a source transaction; other writers of the staging
    store (log store, service state, order ledger) wait for a short commit instead of the whole
    source transaction; and SQLite never has to keep a transaction of hundreds of megabytes
    open while Python produces it (its WAL mode is documented to degrade there).
    """

    def __init__(self, store: StagingStore, source: str = "", *, spill: bool = False) -> None:
        self.store = store
        self.source = source
        self.spills = spill and store.dialect == "sqlite"
        self._conn: sa.Connection | None = None
        self._tx: sa.RootTransaction | None = None
        self._pending: dict[str, _Pending] = {}
        self._spill: _Spill | None = None
        self.pending_count = 0
        self.applied = 0  # changes applied (before coalescing) in this transaction
        self.counts: dict[tuple[str, str], int] = {}
        self._temp_tables: set[str] = set()  # PostgreSQL COPY staging tables made in this txn
        self.closed = False

    @property
    def conn(self) -> sa.Connection:
        """The open staging transaction's connection (opened, and spilled chunks moved into the
        mirrors, on first use: whoever writes through it sees every change applied so far)."""
        if self._conn is None:
            self._conn = self.store.engine.connect()
            self._tx = self._conn.begin()
            if self._spill is not None:
                spill, self._spill = self._spill, None
                spill.materialize(self, self._conn)
        return self._conn

    # apply ---------------------------------------------------------------
    def apply(self, ch: Change) -> None:
        table, op = ch.table, ch.op
        info = self.store._mirrors.get(table)
        if info is None:
            raise KeyError(f"no mirror for {table}: ensure_mirror first")
        self.applied += 1
        ck = (table, op)
        self.counts[ck] = self.counts.get(ck, 0) + 1
        if op == "T":
            self._truncate(info, ch.position)
            return
        pend = self._pending.get(table)
        if pend is None:
            pend = self._pending[table] = _Pending()
        keycols = info.schema.key
        # pending_count counts changes since the last flush (an upper bound of what is held).
        self.pending_count += 1
        if op == "D":
            src = ch.key or ch.values or {}
            k = tuple([src[c] for c in keycols])
            pend.upserts.pop(k, None)
            pend.deletes[k] = ch.position
            return
        values = ch.values or {}
        k = tuple([values[c] for c in keycols])
        upserts = pend.upserts
        if op == "U":
            if ch.key is not None:
                old = tuple([ch.key[c] for c in keycols])
                if old != k:
                    upserts.pop(old, None)
                    pend.deletes[old] = ch.position
            if len(values) < len(info.schema.columns):  # unchanged TOAST columns left out
                prev = upserts.get(k)
                upserts[k] = (
                    ({**prev[0], **values}, prev[1], ch.position)
                    if prev
                    else (values, True, ch.position)
                )
                if pend.deletes:
                    pend.deletes.pop(k, None)
                return
        upserts[k] = (values, False, ch.position)
        if pend.deletes:
            pend.deletes.pop(k, None)

    def _truncate(self, info: MirrorInfo, position: str) -> None:
        self._pending.pop(info.source_table, None)
        self.conn.exec_driver_sql(f"DELETE FROM {self.store.q(info.name)}")
        if self.store.journal_enabled and info.journaled:
            self._journal([(info.source_table, "T", None, position)])

    def flush(self) -> None:
        """Write all pending changes, still invisible to readers of the mirrors: into the open
        transaction, or (SQLite, none open yet) into the spill, in a short transaction."""
        if not self._pending:
            return
        if self._conn is None and self.spills:
            if self._spill is None:
                self._spill = _Spill(self.store)
            self._spill.write(self._pending)
        else:
            self._write_pending(self.conn)
        self._pending.clear()
        self.pending_count = 0

    def _write_pending(self, conn: sa.Connection) -> None:
        store = self.store
        journal: list[tuple[str, str, Any, str]] = []
        dbapi = conn.connection.driver_connection
        assert dbapi is not None
        cur = dbapi.cursor()
        try:
            for table, pend in self._pending.items():
                info = store._mirrors[table]
                journaled = store.journal_enabled and info.journaled
                if pend.deletes:
                    cur.executemany(store.delete_sql(info), list(pend.deletes.keys()))
                    if journaled:
                        journal.extend((table, "D", k, pos) for k, pos in pend.deletes.items())
                for cols, rows in _upsert_groups(pend).items():
                    conv = store.converter(info, cols)
                    if store.dialect == "postgresql" and len(rows) >= _COPY_THRESHOLD:
                        self._copy_upsert(cur, info, cols, (conv(r[0]) for r in rows))
                    else:
                        cur.executemany(store.upsert_sql(info, cols), [conv(r[0]) for r in rows])
                    if journaled:  # group by group, as the spill replays them
                        journal.extend((table, "U", k, pos) for _, k, pos in rows)
        finally:
            cur.close()
        if journal:
            self._journal(journal)

    def _copy_upsert(self, cur: Any, info: MirrorInfo, cols: tuple[str, ...], rows: Any) -> None:
        """PostgreSQL staging, large groups: COPY into a temporary table, then one upsert.

        Several times faster than ``executemany`` for big batches: rows travel in COPY format
        and the server resolves conflicts in one statement. Keys are unique within a group
        (coalesced), so ``ON CONFLICT`` never meets the same row twice.
        """
        store = self.store
        q = store.q
        tmp = q(f"_sync_stage_{info.name}"[:63])
        collist = ", ".join(q(c) for c in cols)
        if info.name not in self._temp_tables:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {tmp} (LIKE {q(info.name)}) ON COMMIT DROP"
            )
            self._temp_tables.add(info.name)
        else:
            cur.execute(f"TRUNCATE {tmp}")
        with cur.copy(f"COPY {tmp} ({collist}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(
            f"INSERT INTO {q(info.name)} ({collist}) SELECT {collist} FROM {tmp} "
            f"{store.conflict_sql(info, cols)}"
        )

    def _journal(self, entries: list[tuple[str, str, Any, str]]) -> None:
        store = self.store
        now = store._now()
        p = store._ph
        dbapi = self.conn.connection.driver_connection
        assert dbapi is not None
        cur = dbapi.cursor()
        rows = ((self.source, t, op, _key_json(k), pos, now) for t, op, k, pos in entries)
        try:
            if store.dialect == "postgresql" and len(entries) >= _COPY_THRESHOLD:
                with cur.copy(
                    "COPY sync_journal (source, table_name, op, row_key, position, at) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
            else:
                cur.executemany(
                    f"INSERT INTO sync_journal (source, table_name, op, row_key, position, at) "
                    f"VALUES ({p}, {p}, {p}, {p}, {p}, {p})",
                    list(rows),
                )
        finally:
            cur.close()

    def commit(self, checkpoint: Checkpoint | None, **kw: Any) -> None:
        """Flush, write ``checkpoint`` in the same transaction, commit."""
        conn = self.conn  # opens the transaction and moves spilled chunks into the mirrors
        self.flush()
        if checkpoint is not None:
            self.store.write_checkpoint(conn, checkpoint, changes=self.applied, **kw)
        assert self._tx is not None
        self._tx.commit()
        self.close()
        if checkpoint is not None and self.counts:
            from replicator.metrics import CHANGES_APPLIED

            for (table, op), n in self.counts.items():
                CHANGES_APPLIED.labels(self.source, table, op).inc(n)

    def rollback(self) -> None:
        self.close()

    def close(self) -> None:
        """Roll back what is not committed; never raises (the connection may be dead)."""
        if not self.closed:
            self.closed = True
            if self._conn is None:
                return
            try:
                if self._tx is not None and self._tx.is_active:
                    self._tx.rollback()
            except Exception as exc:
                log.warning("staging_rollback_failed", error=str(exc).splitlines()[0])
            finally:
                with contextlib.suppress(Exception):
                    self._conn.close()
