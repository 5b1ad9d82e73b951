"""Per-dialect changelog DDL, trigger templates, catalog introspection and connections.

Responsible for everything the trigger mode must know about PostgreSQL, MariaDB and SQLite as
*databases*: how to connect (every connection carries ``application_name`` / ``program_name``),
how a watched table is described (:class:`~replicator.changes.TableSchema`, with PostgreSQL type
names whatever the dialect so that staging mirrors and :mod:`.decode` work the same), and how the
changelog table, the ``<changelog>_meta`` version table and the triggers are installed, checked
and removed. How changes are *read* lives in :mod:`.source`.

Installation is idempotent (``CREATE ... IF NOT EXISTS`` / ``CREATE OR REPLACE``), versioned (one
row per table in ``<changelog>_meta`` with :data:`VERSION` and a hash of the generated DDL, so a
new release or a changed table shows up as *outdated* in ``sync-daemon triggers status``) and
reversible (``uninstall`` drops exactly what ``install`` created). Trigger bodies are templates per
dialect below (Python string templates rather than ``.sql`` files so that they ship with the
package without packaging rules); identifiers are quoted with sqlglot, literals with the dialect's
string-literal rules.

Row images: PostgreSQL writes ``to_jsonb(NEW)`` — the whole row, built in C, which we measured as
cheaper than computing "key + changed columns" in PL/pgSQL (see docs/triggers.md) and which picks
up added columns without reinstalling. MariaDB and SQLite have no row-to-JSON function, so their
templates list the columns (``JSON_OBJECT('c', NEW.c, ...)``); a column added later makes the
table *outdated* until ``triggers install`` is run again.

DDL on a captured column (issue 14): the PostgreSQL function names no column of the table — key,
row filter inputs and column list are read from ``to_jsonb(NEW)`` / ``to_jsonb(OLD)`` — so a
renamed or dropped column never fails the ERP's own writes; the columns it looks up by name are
listed in the function's "reads" line, and :meth:`Dialect.gone_columns` compares them with the
table (``triggers status``: *outdated*, naming the column; the reader's :meth:`table_schema`
raises it). MariaDB triggers must name every column: there the ERP's INSERT/UPDATE fail (1054)
until ``triggers install`` runs, and ``status`` says so from the installed trigger bodies.

Column lists and row filters (``capture.columns`` / ``capture.filters``): the row image holds only
the listed columns (PostgreSQL: the listed keys of ``to_jsonb(NEW)``), and the filter, translated
from the config's PostgreSQL syntax into the dialect (:meth:`Dialect.filter_sql`), decides what is
logged with a publication's rules (an UPDATE leaving the filter is logged as a DELETE, one
entering it as an INSERT). Both are part of the generated DDL, hence of the definition hash: a
changed list or filter shows as *outdated*. The initial copy selects through the same
expressions. Tables with neither keep exactly the DDL (and hash) they had before.
"""

from __future__ import annotations

import contextlib
import decimal
import fcntl
import hashlib
import json
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pymysql
import sqlglot
import sqlglot.expressions as exp
from sqlalchemy.engine import make_url

from replicator.changes import Column, TableSchema
from replicator.config.core import CaptureSection, filter_columns
from replicator.db import app_name, pg_connect
from replicator.errors import ConfigError, SchemaError

VERSION = 2
"""Bump when a template changes: installed triggers then show as outdated until reinstalled."""

DialectName = Literal["postgresql", "mysql", "sqlite"]


@dataclass(frozen=True, slots=True)
class TableStatus:
    """What ``triggers status`` reports for one table."""

    table: str
    state: Literal["current", "outdated", "missing", "error"]
    detail: str = ""


# What a row filter may be made of in trigger mode: conditions every dialect evaluates alike.
# Functions, casts, subqueries and the like are refused (their meaning differs per database).
_FILTER_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.And,
    exp.Or,
    exp.Not,
    exp.Paren,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Like,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Mod,
    exp.Neg,
)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _short_name(base: str, suffix: str, limit: int = 63) -> str:
    name = f"{base}_{suffix}"
    if len(name) <= limit:
        return name
    h = _digest(base)[:8]
    return f"{base[: limit - len(suffix) - 10]}_{h}_{suffix}"


class _HeldLock:
    """The one-consumer-per-changelog lock and the connection that holds it."""

    def __init__(self, dialect: Dialect, conn: Any) -> None:
        self.dialect, self.conn = dialect, conn

    def close(self) -> None:
        try:
            self.dialect._unlock(self.conn)
        finally:
            self.conn.close()


class Dialect(ABC):
    """One ERP database kind: connections, introspection, DDL."""

    name: DialectName
    sqlglot_dialect: str

    def __init__(self, url: str, capture: CaptureSection) -> None:
        self.url = url
        self.capture = capture
        self.changelog = capture.changelog_table
        self.meta = f"{capture.changelog_table}_meta"
        for table in capture.tables:
            self.filter_sql(table, "NEW")  # an untranslatable filter is refused before any DDL

    # -- quoting ---------------------------------------------------------------------------
    def q(self, ident: str) -> str:
        return exp.to_identifier(ident, quoted=True).sql(dialect=self.sqlglot_dialect)

    @staticmethod
    def lit(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    def split(self, table: str) -> tuple[str, str]:
        schema, _, name = table.partition(".")
        return schema, name

    def string_literal(self, value: str) -> str:
        """A string value of a row filter as this dialect's SQL literal."""
        return self.lit(value)

    # -- column lists and row filters --------------------------------------------------------
    def filter_sql(
        self, table: str, alias: str, column: Callable[[str], str] | None = None
    ) -> str | None:
        """``capture.filters[table]`` as this dialect's SQL, its columns read from row ``alias``
        (``NEW``, ``OLD``, or the copy's table alias); ``None`` without a filter. ``column``,
        when given, writes a column's value instead (PostgreSQL triggers read it from the row's
        JSON image, see :meth:`PostgresDialect.json_column`).

        The filter is parsed as PostgreSQL (as the config check does) and written again for the
        dialect from the tree, so identifiers are quoted and string values are literals built
        here; anything outside :data:`_FILTER_NODES` is refused with a :class:`ConfigError`.
        """
        cond = self.capture.row_filter(table)
        if cond is None:
            return None
        where = f"capture.filters.{table} ({cond!r})"
        try:
            tree = sqlglot.parse_one(f"SELECT 1 WHERE {cond}", read="postgres")
        except sqlglot.errors.ParseError:
            raise ConfigError(f"{where} is not a SQL condition") from None
        node = tree.args.get("where")
        if node is None:
            raise ConfigError(f"{where} is not a SQL condition")
        body: exp.Expression = node.this
        for n in body.walk():
            if not isinstance(n, _FILTER_NODES):
                raise ConfigError(
                    f"{where} cannot be evaluated in {self.name} triggers: "
                    f"{n.sql(dialect='postgres')!r} is not supported there (use comparisons, "
                    "AND/OR/NOT, IN, BETWEEN, IS NULL, LIKE, + - * % on columns and constants)"
                )
            if isinstance(n, exp.Column) and n.table:
                raise ConfigError(f"{where}: name columns without a table ({n.sql()!r})")

        def rewrite(n: exp.Expression) -> exp.Expression:
            if isinstance(n, exp.Column) and column is not None:
                return exp.Var(this=column(n.name))
            if isinstance(n, exp.Column):
                return exp.Column(
                    this=exp.to_identifier(n.name, quoted=True),
                    table=exp.to_identifier(alias, quoted=False),
                )
            if isinstance(n, exp.Literal) and n.is_string:
                return exp.Var(this=self.string_literal(n.this))
            return n

        return "(" + body.transform(rewrite).sql(dialect=self.sqlglot_dialect) + ")"

    def spec(self, table: str) -> dict[str, Any]:
        """What of ``table`` reaches staging: column list and row filter (``None``: all)."""
        cols = self.capture.column_list(table)
        return {"columns": list(cols) if cols else None, "filter": self.capture.row_filter(table)}

    def project(self, table: str, schema: TableSchema) -> TableSchema:
        """``schema`` reduced to ``capture.columns[table]`` (in the table's order).

        Refuses (a :class:`SchemaError`, which ``triggers status`` shows as the table's error) a
        list that leaves out a key column or names a column the table does not have, a row
        filter reading a column the table does not have, and a key (``capture.keys``) the table
        does not have: triggers installed for them could not capture the table (MariaDB's and
        SQLite's would fail the ERP's writes), so ``triggers install`` refuses them.
        """
        for k in schema.key:
            if schema.column(k) is None:
                raise SchemaError(
                    f"the key column {k!r} of {table} (capture.keys) is not in the table: "
                    "renamed or dropped? Fix capture.keys, then run `sync-daemon triggers install`"
                )
        cond = self.capture.row_filter(table)
        if cond is not None:
            for c in filter_columns(table, cond):
                if schema.column(c) is None:
                    raise SchemaError(f"capture.filters.{table} reads {c!r}, which {table} has not")
        wanted = self.capture.column_list(table)
        if wanted is None:
            return schema
        for c in wanted:
            if schema.column(c) is None:
                raise SchemaError(f"capture.columns.{table} names {c!r}, which {table} has not")
        for k in schema.key:
            if k not in wanted:
                raise SchemaError(
                    f"capture.columns.{table} must include the key column {k!r} of {table}"
                )
        cols = tuple(c for c in schema.columns if c.name in wanted)
        return TableSchema(schema.schema, schema.name, cols, schema.key)

    @property
    @abstractmethod
    def cl(self) -> str:
        """The quoted, qualified changelog table."""

    # -- connections & catalog ---------------------------------------------------------------
    @abstractmethod
    def connect(self, role: str, *, autocommit: bool = True) -> Any: ...

    @contextlib.contextmanager
    def connection(self, role: str) -> Iterator[Any]:
        """An autocommit connection for one piece of work; closed afterwards (an error while
        closing is ignored: the connection may already be gone)."""
        conn = self.connect(role)
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    @abstractmethod
    def table_schema(self, conn: Any, table: str) -> TableSchema: ...

    def install_schema(self, conn: Any, table: str) -> TableSchema:
        """The table as ``triggers install`` (re)writes its triggers for: as
        :meth:`table_schema`, less the check of what the installed triggers read."""
        return self.table_schema(conn, table)

    def gone_columns(self, conn: Any, table: str) -> list[str]:
        """Columns the installed triggers of ``table`` read by name that the table no longer
        has (renamed or dropped since ``triggers install``). MariaDB and SQLite triggers name
        every column; their ERP writes fail then, see :meth:`gone_message`."""
        return []

    def gone_message(self, table: str, gone: list[str]) -> str:
        cols = ", ".join(repr(c) for c in gone)
        return (
            f"the capture trigger of {table} reads column(s) {cols}, which {table} no longer "
            "has (renamed or dropped): its changes cannot be captured as they are. Change "
            "capture.keys/filters/columns if they name the column, run `sync-daemon triggers "
            f"install`, then `sync-daemon resync --table {table}`"
        )

    @abstractmethod
    def filled_columns(self, conn: Any, table: str, columns: list[str]) -> list[str]:
        """Those of ``columns`` (just added to ``table``) whose existing rows may hold a value:
        a default or a generated column. The ERP filled them without firing a trigger."""

    def key_for(self, table: str, catalog_key: list[str]) -> tuple[str, ...]:
        key = self.capture.key_columns(table) or tuple(catalog_key)
        if not key:
            raise SchemaError(
                f'{table} has no primary key; set capture.keys."{table}" = ["col", ...]'
            )
        return tuple(key)

    # -- install / status / uninstall --------------------------------------------------------
    @abstractmethod
    def base_ddl(self) -> list[str]:
        """The changelog and meta tables (idempotent)."""

    @abstractmethod
    def table_ddl(self, schema: TableSchema, table: str) -> list[str]:
        """Functions and triggers of one watched table (idempotent, replaces older versions)."""

    @abstractmethod
    def drop_ddl(self, table: str) -> list[str]: ...

    @abstractmethod
    def drop_base_ddl(self) -> list[str]: ...

    @abstractmethod
    def trigger_names(self, table: str) -> list[str]: ...

    @abstractmethod
    def present_triggers(self, conn: Any, table: str) -> dict[str, bool]:
        """Trigger name -> enabled as required, for the triggers that exist on ``table``."""

    def consumer_lock(self) -> Any:
        """Hold the one-consumer-per-changelog lock (a second reader would delete entries the
        first has not applied); returns the holder to close, or ``None`` if another has it."""
        conn = self.connect("capture-lock")
        if self._try_lock(conn):
            return _HeldLock(self, conn)
        conn.close()
        return None

    def _try_lock(self, conn: Any) -> bool:
        return True

    def _unlock(self, conn: Any) -> None:
        """Release the lock explicitly: closing the socket alone returns before the server's
        session ends, and a reader started right after would find the lock still held.
        Dialects without a server-side lock have nothing to release."""
        return None

    def lock_name(self) -> str:
        return f"sync-daemon:{self.changelog}"

    def definition_hash(self, schema: TableSchema, table: str) -> str:
        return _digest(str(VERSION), *self.table_ddl(schema, table))

    @abstractmethod
    def copy_sql(self, schema: TableSchema, table: str) -> str:
        """SELECT returning one JSON text per row, built like the trigger's row image."""

    # -- online copy of one table, chunk by chunk (see source.py) -----------------------------
    @abstractmethod
    def chunk_sql(
        self, schema: TableSchema, table: str, after: list[str] | None, limit: int
    ) -> str:
        """The next chunk of an online table copy: like :meth:`copy_sql` (same row image, same
        row filter), only rows whose key is after ``after`` (as :meth:`key_after` wrote it), in
        key order, at most ``limit``; each row is the JSON text followed by the key columns."""

    @abstractmethod
    def key_after(self, values: tuple[Any, ...]) -> list[str]:
        """The key columns of a chunk's last row (as the driver returned them) in the form
        :meth:`chunk_sql` takes back: they are persisted with the checkpoint."""

    def copy_from(self, schema: TableSchema, table: str) -> str:
        """``table`` as the copy's FROM names it."""
        return self.q(schema.name)

    def count_sql(self, schema: TableSchema, table: str) -> str:
        """How many rows of ``table`` the copy will take (its row filter applies)."""
        where = self.filter_sql(table, "t")
        return f"SELECT count(*) FROM {self.copy_from(schema, table)} AS t" + (
            f" WHERE {self._filter_true(where)}" if where else ""
        )

    @staticmethod
    def _filter_true(where: str) -> str:
        return f"COALESCE({where}, 0)"

    def _chunk_sql(
        self, image: str, keys: list[str], after: list[str] | None, from_: str, table: str, n: int
    ) -> str:
        """The chunk SELECT around the dialect's row ``image``; ``after`` holds SQL literals.

        A row-value comparison ``(a, b) > (x, y)`` (PostgreSQL, MariaDB, SQLite 3.15+) walks a
        composite key in the same order as ``ORDER BY a, b``."""
        where: list[str] = []
        cond = self.filter_sql(table, "t")
        if cond:
            where.append(self._filter_true(cond))
        cols = [f"t.{self.q(k)}" for k in keys]
        if after is not None:
            where.append(f"({', '.join(cols)}) > ({', '.join(after)})")
        return (
            f"SELECT {image}, {', '.join(self._key_select(c) for c in cols)} FROM {from_} AS t"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY {', '.join(cols)} LIMIT {int(n)}"
        )

    def _key_select(self, col: str) -> str:
        return col

    # helpers shared by the DB-API based implementations
    def _exec(self, conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
        cur = conn.cursor()
        cur.execute(sql, params) if params else cur.execute(sql)
        return cur

    def meta_rows(self, conn: Any) -> dict[str, tuple[int, str]]:
        try:
            cur = self._exec(conn, f"SELECT table_name, version, definition_hash FROM {self.qmeta}")
        except Exception:
            self.reset(conn)
            return {}
        return {r[0]: (int(r[1]), r[2]) for r in cur.fetchall()}

    def reset(self, conn: Any) -> None:  # noqa: B027 - optional hook
        """After a failed statement: make the connection usable again."""

    @property
    @abstractmethod
    def qmeta(self) -> str: ...

    @abstractmethod
    def upsert_meta_sql(self) -> str: ...

    def install(self, conn: Any, tables: list[str]) -> list[TableSchema]:
        """Create the changelog and the triggers of ``tables``, and remove the triggers of
        tables that left ``capture.tables``; returns the schemas of ``tables``."""
        schemas = [self.install_schema(conn, t) for t in tables]
        stale = sorted(set(self.meta_rows(conn)) - set(tables))
        # The changelog first, in a transaction of its own: the triggers' transaction must not
        # hold a lock on the changelog (CREATE INDEX IF NOT EXISTS takes one) while it waits for
        # a watched table, whose writers wait for the changelog after locking their row — a
        # deadlock that aborted ERP transactions during `triggers install`.
        self._run_ddl(conn, list(self.base_ddl()), [])
        stmts: list[str] = []
        for t in stale:
            stmts.extend(self.drop_ddl(t))
            stmts.append(f"DELETE FROM {self.qmeta} WHERE table_name = {self.lit(t)}")
        metas: list[tuple[str, int, str]] = []
        for table, schema in zip(tables, schemas, strict=True):
            stmts.extend(self.table_ddl(schema, table))
            metas.append((table, VERSION, self.definition_hash(schema, table)))
        self._run_ddl(conn, stmts, metas)
        return schemas

    @abstractmethod
    def _run_ddl(self, conn: Any, stmts: list[str], metas: list[tuple[str, int, str]]) -> None: ...

    def uninstall(self, conn: Any, tables: list[str]) -> list[str]:
        """Drop the triggers of ``tables`` and of every table the meta table lists, then the
        changelog and meta tables. Returns the tables whose triggers were removed."""
        known = set(self.meta_rows(conn)) | set(tables)
        stmts: list[str] = []
        for t in sorted(known):
            stmts.extend(self.drop_ddl(t))
        stmts.extend(self.drop_base_ddl())
        self._run_ddl(conn, stmts, [])
        return sorted(known)

    def status(self, conn: Any, tables: list[str]) -> list[TableStatus]:
        metas = self.meta_rows(conn)
        out: list[TableStatus] = []
        for t in tables:
            try:
                gone = self.gone_columns(conn, t)
            except SchemaError:
                gone = []  # the table is gone or keyless: said just below
            try:
                schema = self.install_schema(conn, t)
            except SchemaError as exc:
                if gone:  # the config names the column too: it must follow the DDL
                    out.append(TableStatus(t, "outdated", f"{self.gone_message(t, gone)} ({exc})"))
                else:
                    out.append(TableStatus(t, "error", str(exc)))
                continue
            present = self.present_triggers(conn, t)
            want = self.trigger_names(t)
            missing = [n for n in want if n not in present]
            disabled = [n for n in want if n in present and not present[n]]
            meta = metas.get(t)
            if missing and len(missing) == len(want):
                out.append(TableStatus(t, "missing", "no capture trigger"))
            elif missing or disabled:
                detail = ", ".join(
                    [f"missing {n}" for n in missing]
                    + [f"not ENABLE ALWAYS: {n}" for n in disabled]
                )
                out.append(TableStatus(t, "outdated", detail))
            elif gone:
                out.append(TableStatus(t, "outdated", self.gone_message(t, gone)))
            elif meta is None:
                out.append(TableStatus(t, "outdated", "triggers present but not recorded in meta"))
            elif meta[0] != VERSION:
                out.append(TableStatus(t, "outdated", f"version {meta[0]}, current is {VERSION}"))
            elif meta[1] != self.definition_hash(schema, t):
                out.append(TableStatus(t, "outdated", "table or settings changed since install"))
            else:
                out.append(TableStatus(t, "current", f"version {VERSION}"))
        for t in sorted(set(metas) - set(tables)):
            out.append(TableStatus(t, "outdated", "installed but no longer in capture.tables"))
        return out


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------

_PG_CHANGELOG = """\
CREATE TABLE IF NOT EXISTS {cl} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at timestamptz NOT NULL DEFAULT now(),
    tbl text NOT NULL,
    op "char" NOT NULL,
    row_data jsonb,
    old_key jsonb
)"""

_PG_META = """\
CREATE TABLE IF NOT EXISTS {meta} (
    table_name text PRIMARY KEY,
    version integer NOT NULL,
    definition_hash text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
)"""

_PG_NOTIFY_FN = """\
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $sync$
BEGIN
    PERFORM pg_notify({channel}, '');
    RETURN NULL;
END
$sync$"""

# One function per table. It names no column of the table: the key, the row filter's inputs and
# the row image are read from to_jsonb(NEW) / to_jsonb(OLD), so an
# ALTER TABLE that renames or drops a column never makes the ERP's own INSERT/UPDATE/DELETE fail
# (a PL/pgSQL NEW.col would: `record "new" has no field "col"`). What such DDL does to capture
# (a key missing from the image) is found on our side: the "reads" line below lists the columns
# the function looks up by name; `triggers status` and the reader's catalog check compare it with
# the table (PostgresDialect.gone_columns). A missing key gives a NULL old key, never a wrong one.
_PG_CAPTURE_FN = """\
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $sync$
-- sync-daemon reads: {reads}
DECLARE
    sync_new jsonb;
    sync_old jsonb;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        sync_new := to_jsonb(NEW);
        sync_old := to_jsonb(OLD);
        INSERT INTO {cl} (tbl, op, row_data, old_key)
        VALUES ({tbl}, 'U', {new_image},
                CASE WHEN {key_changed} THEN {old_key} END);
    ELSIF TG_OP = 'INSERT' THEN
        sync_new := to_jsonb(NEW);
        INSERT INTO {cl} (tbl, op, row_data) VALUES ({tbl}, 'I', {new_image});
    ELSIF TG_OP = 'DELETE' THEN
        sync_old := to_jsonb(OLD);
        INSERT INTO {cl} (tbl, op, old_key) VALUES ({tbl}, 'D', {old_key});
    ELSE
        INSERT INTO {cl} (tbl, op) VALUES ({tbl}, 'T');
    END IF;
    RETURN NULL;
END
$sync$"""


# The same with a row filter, with PostgreSQL's publication semantics: INSERT and DELETE are
# logged when the new (inserted) or old (deleted) row matches; an UPDATE whose old row matched
# and new row does not becomes a DELETE of the old key, the reverse becomes an INSERT, and one
# where neither matched is not logged. NULL counts as not matching — also a filter column that
# is gone from the table (renamed, dropped): nothing is logged for it then, and `triggers status`
# and the reader's catalog check name the column (the config's filter must change with it).
_PG_CAPTURE_FILTERED_FN = """\
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $sync$
-- sync-daemon reads: {reads}
DECLARE
    sync_new jsonb;
    sync_old jsonb;
    old_match boolean := false;
    new_match boolean := false;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        sync_old := to_jsonb(OLD);
        old_match := coalesce({old_filter}, false);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        sync_new := to_jsonb(NEW);
        new_match := coalesce({new_filter}, false);
    END IF;
    IF TG_OP = 'UPDATE' AND old_match AND new_match THEN
        INSERT INTO {cl} (tbl, op, row_data, old_key)
        VALUES ({tbl}, 'U', {new_image},
                CASE WHEN {key_changed} THEN {old_key} END);
    ELSIF TG_OP IN ('UPDATE', 'INSERT') AND new_match AND NOT old_match THEN
        INSERT INTO {cl} (tbl, op, row_data) VALUES ({tbl}, 'I', {new_image});
    ELSIF TG_OP IN ('UPDATE', 'DELETE') AND old_match AND NOT new_match THEN
        INSERT INTO {cl} (tbl, op, old_key) VALUES ({tbl}, 'D', {old_key});
    ELSIF TG_OP = 'TRUNCATE' THEN
        INSERT INTO {cl} (tbl, op) VALUES ({tbl}, 'T');
    END IF;
    RETURN NULL;
END
$sync$"""

_READS_MARK = "-- sync-daemon reads: "


class PostgresDialect(Dialect):
    name: DialectName = "postgresql"
    sqlglot_dialect = "postgres"
    cl_schema = "public"

    @property
    def cl(self) -> str:
        return f"{self.q(self.cl_schema)}.{self.q(self.changelog)}"

    @property
    def qmeta(self) -> str:
        return f"{self.q(self.cl_schema)}.{self.q(self.meta)}"

    @property
    def notify_fn(self) -> str:
        return f"{self.q(self.cl_schema)}.{self.q(self.changelog + '_notify')}"

    def qtable(self, table: str) -> str:
        s, n = self.split(table)
        return f"{self.q(s)}.{self.q(n)}"

    def capture_fn(self, table: str) -> str:
        s, n = self.split(table)
        base = f"{self.changelog}_{n}" if s == "public" else f"{self.changelog}_{s}_{n}"
        return f"{self.q(self.cl_schema)}.{self.q(_short_name(base, 'fn'))}"

    def trigger_names(self, table: str) -> list[str]:
        names = [f"{self.changelog}_row", f"{self.changelog}_truncate"]
        if self.capture.notify:
            names.append(f"{self.changelog}_notify")
        return names

    def connect(self, role: str, *, autocommit: bool = True) -> Any:
        return pg_connect(self.url, role, autocommit=autocommit)

    def reset(self, conn: Any) -> None:
        if not conn.autocommit:
            conn.rollback()

    def _try_lock(self, conn: Any) -> bool:
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self.lock_name(),))
        return bool(row.fetchone()[0])

    def _unlock(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.lock_name(),))

    def table_schema(self, conn: Any, table: str) -> TableSchema:
        """The table as captured; a :class:`SchemaError` when the installed capture function
        reads a column the table no longer has (the reader stops on it, naming the column,
        instead of applying images without their key)."""
        raw = self._catalog_schema(conn, table)
        gone = self._gone(conn, table, raw)
        if gone:
            raise SchemaError(self.gone_message(table, gone))
        return self.project(table, raw)

    def install_schema(self, conn: Any, table: str) -> TableSchema:
        return self.project(table, self._catalog_schema(conn, table))

    def gone_columns(self, conn: Any, table: str) -> list[str]:
        return self._gone(conn, table, self._catalog_schema(conn, table))

    def _gone(self, conn: Any, table: str, raw: TableSchema) -> list[str]:
        """The columns the installed capture function of ``table`` reads by name (its "reads"
        line) that ``raw`` (the catalog's columns) has not."""
        row = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)",
            (self.capture_fn(table) + "()",),
        ).fetchone()
        if row is None:
            return []
        for line in str(row[0]).splitlines():
            if line.startswith(_READS_MARK):
                reads = json.loads(line[len(_READS_MARK) :])
                return [c for c in reads if raw.column(c) is None]
        return []  # a function of an older version: `status` reports the version

    def _catalog_schema(self, conn: Any, table: str) -> TableSchema:
        s, n = self.split(table)
        rel = conn.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace "
            "WHERE ns.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (s, n),
        ).fetchone()
        if rel is None:
            raise SchemaError(f"table {table} not found in the ERP database")
        cols = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod), atttypid::int, NOT attnotnull, "
            "attnum FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            (rel[0],),
        ).fetchall()
        pk = [
            r[0]
            for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s AND i.indisprimary "
                "ORDER BY array_position(i.indkey::int2[], a.attnum)",
                (rel[0],),
            ).fetchall()
        ]
        columns = tuple(Column(c[0], c[1], c[2], c[3], int(c[4])) for c in cols)
        return TableSchema(s, n, columns, self.key_for(table, pk))

    def filled_columns(self, conn: Any, table: str, columns: list[str]) -> list[str]:
        # atthasmissing: ADD COLUMN ... DEFAULT stored once for the old rows; a default in
        # pg_attrdef also covers a volatile default or a generated column (the table was
        # rewritten).
        rows = conn.execute(
            "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass "
            "AND a.attname = ANY(%s) AND NOT a.attisdropped AND (a.atthasmissing OR EXISTS "
            "(SELECT 1 FROM pg_attrdef d WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum))",
            (self.qtable(table), columns),
        ).fetchall()
        return sorted(r[0] for r in rows)

    def image(self, table: str, row: str) -> str:
        """The JSON row image of ``row`` (a row value such as ``NEW`` or ``t.*``).

        Without a column list, ``to_jsonb`` of the whole row. With one, the listed keys of it:
        not ``jsonb_build_object(NEW.a, ...)``, which would make every write to the ERP table
        fail once a listed column is renamed or dropped; this way the image just lacks the
        column and the daemon stops, saying so, while the ERP goes on.
        """
        return self.json_image(table, f"to_jsonb({row})")

    def json_image(self, table: str, image: str) -> str:
        """:meth:`image` from the row's JSON ``image`` (the trigger's ``sync_new``)."""
        cols = self.capture.column_list(table)
        if cols is None:
            return image
        names = ", ".join(self.lit(c) for c in cols)
        return (
            f"(SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each({image}) AS e "
            f"WHERE e.key = ANY (ARRAY[{names}]::text[]))"
        )

    def json_column(self, schema: TableSchema, image: str) -> Callable[[str], str]:
        """A row filter's column read from the row's JSON ``image``, typed as the column (the
        filter compares typed values): ``NULL`` when the column is gone, never an error in the
        ERP's transaction. The text form ``to_jsonb`` writes casts back to the type; a (one-
        dimensional) array is rebuilt from its JSON elements."""

        def column(name: str) -> str:
            col = schema.column(name)
            value = f"({image} ->> {self.lit(name)})"
            if col is None:  # refused by project() before any DDL; typed as text regardless
                return value
            if col.type_name.endswith("[]"):
                return (
                    f"(CASE WHEN jsonb_typeof({image} -> {self.lit(name)}) = 'array' THEN "
                    f"ARRAY(SELECT jsonb_array_elements_text({image} -> {self.lit(name)}))"
                    f"::{col.type_name} END)"
                )
            return f"CAST({value} AS {col.type_name})"

        return column

    def base_ddl(self) -> list[str]:
        ddl = [
            _PG_META.format(meta=self.qmeta),
            _PG_CHANGELOG.format(cl=self.cl),
            # Batches are selected by transaction id range (see source.py).
            f"CREATE INDEX IF NOT EXISTS {self.q(self.changelog + '_txid')} ON {self.cl} (txid)",
        ]
        if self.capture.notify:
            ddl.append(_PG_NOTIFY_FN.format(fn=self.notify_fn, channel=self.lit(self.changelog)))
        return ddl

    def table_ddl(self, schema: TableSchema, table: str) -> list[str]:
        fn = self.capture_fn(table)
        t = self.qtable(table)
        key = schema.key
        keys = ", ".join(self.lit(k) for k in key)
        cond = self.capture.row_filter(table)
        listed = self.capture.column_list(table) or ()
        reads = list(dict.fromkeys([*key, *(filter_columns(table, cond) if cond else []), *listed]))
        args = {
            "fn": fn,
            "cl": self.cl,
            "tbl": self.lit(table),
            "reads": json.dumps(reads),
            # JSON values compare as the typed values do for every type to_jsonb writes.
            "key_changed": (
                f"jsonb_build_array({', '.join(f'sync_old -> {self.lit(k)}' for k in key)}) "
                f"IS DISTINCT FROM "
                f"jsonb_build_array({', '.join(f'sync_new -> {self.lit(k)}' for k in key)})"
            ),
            # NULL, not {"id": null}, when a key column is gone: a delete without a key cannot
            # be applied (the reader stops), one with a NULL key would silently match nothing.
            "old_key": (
                f"CASE WHEN sync_old ?& ARRAY[{keys}]::text[] THEN jsonb_build_object("
                + ", ".join(f"{self.lit(k)}, sync_old -> {self.lit(k)}" for k in key)
                + ") END"
            ),
            "new_image": self.json_image(table, "sync_new"),
        }
        new_filter = self.filter_sql(table, "NEW", self.json_column(schema, "sync_new"))
        if new_filter is None:
            capture_fn = _PG_CAPTURE_FN.format(**args)
        else:
            capture_fn = _PG_CAPTURE_FILTERED_FN.format(
                **args,
                new_filter=new_filter,
                old_filter=self.filter_sql(table, "OLD", self.json_column(schema, "sync_old")),
            )
        stmts = [
            capture_fn,
            f"CREATE OR REPLACE TRIGGER {self.q(self.changelog + '_row')} "
            f"AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION {fn}()",
            f"CREATE OR REPLACE TRIGGER {self.q(self.changelog + '_truncate')} "
            f"AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
        ]
        if self.capture.notify:
            stmts.append(
                f"CREATE OR REPLACE TRIGGER {self.q(self.changelog + '_notify')} "
                f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {self.notify_fn}()"
            )
        else:
            stmts.append(f"DROP TRIGGER IF EXISTS {self.q(self.changelog + '_notify')} ON {t}")
        # Fire also in sessions with session_replication_role = replica (bulk loads, pglogical).
        stmts.extend(
            f"ALTER TABLE {t} ENABLE ALWAYS TRIGGER {self.q(n)}" for n in self.trigger_names(table)
        )
        return stmts

    def drop_ddl(self, table: str) -> list[str]:
        t = self.qtable(table)
        drops = [
            f"DROP TRIGGER IF EXISTS {self.q(self.changelog + sfx)} ON {t}"
            for sfx in ("_row", "_truncate", "_notify")
        ]
        stmts = [
            f"DO $sync$ BEGIN IF to_regclass({self.lit(t)}) IS NOT NULL THEN "
            + " ".join(f"EXECUTE {self.lit(d)};" for d in drops)
            + " END IF; END $sync$",
            f"DROP FUNCTION IF EXISTS {self.capture_fn(table)}()",
        ]
        return stmts

    def drop_base_ddl(self) -> list[str]:
        return [
            f"DROP FUNCTION IF EXISTS {self.notify_fn}()",
            f"DROP TABLE IF EXISTS {self.cl}",
            f"DROP TABLE IF EXISTS {self.qmeta}",
        ]

    def present_triggers(self, conn: Any, table: str) -> dict[str, bool]:
        s, n = self.split(table)
        rows = conn.execute(
            "SELECT t.tgname, t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace ns ON ns.oid = c.relnamespace "
            "WHERE ns.nspname = %s AND c.relname = %s AND NOT t.tgisinternal",
            (s, n),
        ).fetchall()
        return {r[0]: r[1] == "A" for r in rows}

    def upsert_meta_sql(self) -> str:
        return (
            f"INSERT INTO {self.qmeta} (table_name, version, definition_hash) VALUES (%s, %s, %s) "
            "ON CONFLICT (table_name) DO UPDATE SET version = excluded.version, "
            "definition_hash = excluded.definition_hash, installed_at = now()"
        )

    def _run_ddl(self, conn: Any, stmts: list[str], metas: list[tuple[str, int, str]]) -> None:
        # All or nothing: PostgreSQL DDL is transactional, so no window without a trigger.
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '10s'")
            for s in stmts:
                conn.execute(s)
            for m in metas:
                conn.execute(self.upsert_meta_sql(), m)

    def copy_sql(self, schema: TableSchema, table: str) -> str:
        # t.* (not t): a column named "t" would shadow the row.
        where = self.filter_sql(table, "t")
        return f"SELECT {self.image(table, 't.*')}::text FROM {self.qtable(table)} AS t" + (
            f" WHERE {self._filter_true(where)}" if where else ""
        )

    @staticmethod
    def _filter_true(where: str) -> str:
        return f"coalesce({where}, false)"

    def _key_select(self, col: str) -> str:
        return f"{col}::text"  # the key's text form: CAST back to its type (chunk_sql)

    def key_after(self, values: tuple[Any, ...]) -> list[str]:
        return [str(v) for v in values]

    def chunk_sql(
        self, schema: TableSchema, table: str, after: list[str] | None, limit: int
    ) -> str:
        lits = None
        if after is not None:
            types = {c.name: c.type_name for c in schema.columns}
            lits = [
                f"CAST({self.lit(v)} AS {types[k]})" for k, v in zip(schema.key, after, strict=True)
            ]
        return self._chunk_sql(
            f"{self.image(table, 't.*')}::text",
            list(schema.key),
            lits,
            self.copy_from(schema, table),
            table,
            limit,
        )

    def copy_from(self, schema: TableSchema, table: str) -> str:
        return self.qtable(table)

    def rewritten_sql(self, table: str) -> str:
        """True when ``table`` was rewritten (``ALTER TABLE ... TYPE``, ``TRUNCATE``) after the
        reading transaction's snapshot was taken. Such DDL is not MVCC-safe: the new file's rows
        all carry the DDL's transaction id, so the old snapshot sees the table *empty*. The
        catalog row read under the snapshot still names the old file; ``pg_relation_filenode``
        reads the current catalog. Asked after the chunk's SELECT, which holds the table's
        ACCESS SHARE lock, so no rewrite can commit in between."""
        return (
            "SELECT c.relfilenode <> pg_relation_filenode(c.oid) FROM pg_class c "
            f"WHERE c.oid = {self.lit(self.qtable(table))}::regclass"
        )


# ---------------------------------------------------------------------------------------------
# MariaDB / MySQL
# ---------------------------------------------------------------------------------------------

_MY_CHANGELOG = """\
CREATE TABLE IF NOT EXISTS {cl} (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    tbl VARCHAR(200) NOT NULL,
    op CHAR(1) NOT NULL,
    row_data LONGTEXT NULL,
    old_key LONGTEXT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""

_MY_META = """\
CREATE TABLE IF NOT EXISTS {meta} (
    table_name VARCHAR(200) NOT NULL PRIMARY KEY,
    version INT NOT NULL,
    definition_hash VARCHAR(64) NOT NULL,
    installed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""

_MY_INSERT = (
    "CREATE OR REPLACE TRIGGER {name} AFTER INSERT ON {t} FOR EACH ROW\n"
    "INSERT INTO {cl} (tbl, op, row_data) VALUES ({tbl}, 'I', {new_image})"
)
_MY_UPDATE = (
    "CREATE OR REPLACE TRIGGER {name} AFTER UPDATE ON {t} FOR EACH ROW\n"
    "INSERT INTO {cl} (tbl, op, row_data, old_key) VALUES ({tbl}, 'U', {new_image},\n"
    "    IF({key_changed}, {old_key}, NULL))"
)
_MY_DELETE = (
    "CREATE OR REPLACE TRIGGER {name} AFTER DELETE ON {t} FOR EACH ROW\n"
    "INSERT INTO {cl} (tbl, op, old_key) VALUES ({tbl}, 'D', {old_key})"
)

# A column of the trigger's row as the MariaDB templates write it (NEW.`col`, OLD.`col`).
_MY_ROW_COLUMN = re.compile(r"\b(?:NEW|OLD)\.`((?:[^`]|``)+)`")

_MY_INT = {
    "tinyint": "smallint",
    "smallint": "smallint",
    "mediumint": "integer",
    "int": "integer",
    "integer": "integer",
    "bigint": "bigint",
    "year": "integer",
    "bit": "bigint",
}
_MY_BIN = {"blob", "tinyblob", "mediumblob", "longblob", "binary", "varbinary"}


class _ListedColumnsDialect(Dialect):
    """MariaDB and SQLite: no row-to-JSON function, so row images list the columns.

    Both build the trigger templates' row images with ``<json_object>('col', value, ...)`` and
    fill the same template arguments; only the JSON function's spelling, how a column's value is
    written (:meth:`_value`) and how a changed key is detected (:meth:`_key_changed`) differ.
    """

    json_object: str
    """The dialect's JSON object constructor, as written in the trigger body."""

    @abstractmethod
    def _value(self, col: Column, alias: str) -> str:
        """The column of row ``alias`` as it goes into the JSON row image."""

    @abstractmethod
    def _key_changed(self, key_column: str) -> str:
        """A condition true when an UPDATE changed ``key_column`` (NULL-safe)."""

    def image(self, cols: tuple[Column, ...], alias: str) -> str:
        return (
            f"{self.json_object}("
            + ", ".join(f"{self.lit(c.name)}, {self._value(c, alias)}" for c in cols)
            + ")"
        )

    def _template_args(self, schema: TableSchema, table: str, t: str) -> dict[str, str]:
        """The arguments of the INSERT/UPDATE/DELETE trigger templates of ``table`` (``t``:
        the table as the trigger names it)."""
        keycols = tuple(c for k in schema.key for c in schema.columns if c.name == k)
        return {
            "t": t,
            "cl": self.cl,
            "tbl": self.lit(table),
            "new_image": self.image(schema.columns, "NEW"),
            "old_key": self.image(keycols, "OLD"),
            "key_changed": " OR ".join(self._key_changed(k) for k in schema.key),
        }

    def drop_base_ddl(self) -> list[str]:
        return [f"DROP TABLE IF EXISTS {self.cl}", f"DROP TABLE IF EXISTS {self.qmeta}"]

    from_dual = ""
    """What a ``SELECT`` without a table needs to take a ``WHERE`` clause."""

    def filtered_bodies(self, schema: TableSchema, table: str) -> dict[str, list[str]] | None:
        """With a row filter: the statements of the INSERT, UPDATE and DELETE triggers ("I",
        "U", "D"), each an ``INSERT ... SELECT ... WHERE`` that logs only what PostgreSQL's
        publication row filter would publish (see ``_PG_CAPTURE_FILTERED_FN``); ``None``
        without a filter (the plain templates apply)."""
        new_f = self.filter_sql(table, "NEW")
        old_f = self.filter_sql(table, "OLD")
        if new_f is None or old_f is None:
            return None
        a = self._template_args(schema, table, "")
        new_m, old_m = self._filter_true(new_f), self._filter_true(old_f)

        def logged(cols: str, values: str, cond: str) -> str:
            return (
                f"INSERT INTO {self.cl} (tbl, {cols}) SELECT {a['tbl']}, {values}{self.from_dual} "
                f"WHERE {cond}"
            )

        def insert(cond: str) -> str:
            return logged("op, row_data", f"'I', {a['new_image']}", cond)

        def delete(cond: str) -> str:
            return logged("op, old_key", f"'D', {a['old_key']}", cond)

        update = logged(
            "op, row_data, old_key",
            f"'U', {a['new_image']}, CASE WHEN {a['key_changed']} THEN {a['old_key']} END",
            f"{old_m} AND {new_m}",
        )
        return {
            "I": [insert(new_m)],
            "U": [update, delete(f"{old_m} AND NOT {new_m}"), insert(f"NOT {old_m} AND {new_m}")],
            "D": [delete(old_m)],
        }

    def listed_copy_sql(self, schema: TableSchema, table: str, t: str) -> str:
        """The initial copy's SELECT (``t``: the table as written in FROM)."""
        where = self.filter_sql(table, "t")
        return f"SELECT {self.image(schema.columns, 't')} FROM {t} AS t" + (
            f" WHERE {self._filter_true(where)}" if where else ""
        )

    def key_after(self, values: tuple[Any, ...]) -> list[str]:
        # SQL literals of the values as the driver gave them: the value's own kind decides
        # (an SQLite column without a declared type holds integers that must compare as such).
        out: list[str] = []
        for v in values:
            if v is None:
                raise SchemaError("a key column holds NULL: the table cannot be copied by key")
            if isinstance(v, bool):
                out.append(str(int(v)))
            elif isinstance(v, int | float | decimal.Decimal):
                out.append(str(v))
            elif isinstance(v, bytes | bytearray):
                out.append(f"X'{bytes(v).hex()}'")
            else:
                out.append(self.string_literal(str(v)))
        return out

    def listed_chunk_sql(
        self, schema: TableSchema, table: str, t: str, after: list[str] | None, limit: int
    ) -> str:
        return self._chunk_sql(
            self.image(schema.columns, "t"), list(schema.key), after, t, table, limit
        )


def mysql_pg_type(data_type: str, column_type: str) -> str:
    """A MariaDB column type described with the PostgreSQL name staging mirrors use."""
    dtp = data_type.lower()
    unsigned = "unsigned" in column_type.lower()
    if dtp in _MY_INT:
        t = _MY_INT[dtp]
        if unsigned and t == "integer":
            return "bigint"
        if unsigned and t == "bigint" and dtp == "bigint":
            return "numeric(20,0)"
        return t
    if dtp in ("decimal", "numeric"):
        inside = ""
        if "(" in column_type:
            inside = column_type[column_type.find("(") :].split(")")[0] + ")"
        return f"numeric{inside}"
    if dtp == "float":
        return "real"
    if dtp in ("double", "real"):
        return "double precision"
    if dtp == "date":
        return "date"
    if dtp == "datetime":
        return "timestamp without time zone"
    if dtp == "timestamp":
        return "timestamp with time zone"  # captured as UNIX_TIMESTAMP(): session time zone free
    if dtp in _MY_BIN:
        return "bytea"
    if dtp == "json":
        return "jsonb"
    return "text"  # char, varchar, text, enum, set, time (may exceed 24 h), ...


class MysqlDialect(_ListedColumnsDialect):
    name: DialectName = "mysql"
    sqlglot_dialect = "mysql"
    json_object = "JSON_OBJECT"
    from_dual = " FROM DUAL"

    def __init__(self, url: str, capture: CaptureSection) -> None:
        super().__init__(url, capture)
        u = make_url(url)
        if not u.database:
            raise SchemaError("erp.dsn must name the MariaDB database, e.g. mysql://user@host/erp")
        self.database = u.database
        self._u = u

    @property
    def cl(self) -> str:
        return f"{self.q(self.database)}.{self.q(self.changelog)}"

    @property
    def qmeta(self) -> str:
        return f"{self.q(self.database)}.{self.q(self.meta)}"

    def db_of(self, table: str) -> str:
        s, _ = self.split(table)
        return self.database if s == "public" else s

    def qtable(self, table: str) -> str:
        return f"{self.q(self.db_of(table))}.{self.q(self.split(table)[1])}"

    def trigger_names(self, table: str) -> list[str]:
        s, n = self.split(table)
        base = f"{self.changelog}_{n}" if s == "public" else f"{self.changelog}_{s}_{n}"
        return [_short_name(base, sfx, 64) for sfx in ("ins", "upd", "del")]

    def connect(self, role: str, *, autocommit: bool = True) -> Any:
        u = self._u
        conn = pymysql.connect(
            host=u.host or "127.0.0.1",
            port=u.port or 3306,
            user=u.username or "root",
            password=u.password or "",
            database=u.database,
            charset="utf8mb4",
            autocommit=autocommit,
            program_name=app_name(role),
            connect_timeout=10,
        )
        with conn.cursor() as cur:
            # Each statement reads what is committed when it starts (see source.py).
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cur.execute("SET SESSION time_zone = '+00:00'")
        return conn

    def _try_lock(self, conn: Any) -> bool:
        cur = self._exec(conn, "SELECT GET_LOCK(%s, 0)", (f"{self.lock_name()}:{self.database}",))
        return bool(cur.fetchone()[0])

    def _unlock(self, conn: Any) -> None:
        self._exec(conn, "SELECT RELEASE_LOCK(%s)", (f"{self.lock_name()}:{self.database}",))

    def table_schema(self, conn: Any, table: str) -> TableSchema:
        db, n = self.db_of(table), self.split(table)[1]
        cur = self._exec(
            conn,
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, IS_NULLABLE "
            "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s "
            "ORDER BY ORDINAL_POSITION",
            (db, n),
        )
        cols = cur.fetchall()
        if not cols:
            raise SchemaError(f"table {table} ({db}.{n}) not found in the ERP database")
        cur = self._exec(
            conn,
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = %s "
            "AND TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
            (db, n),
        )
        pk = [r[0] for r in cur.fetchall()]
        columns = tuple(Column(c[0], mysql_pg_type(c[1], c[2]), 0, c[3] == "YES") for c in cols)
        return self.project(
            table, TableSchema(self.split(table)[0], n, columns, self.key_for(table, pk))
        )

    def filled_columns(self, conn: Any, table: str, columns: list[str]) -> list[str]:
        # MariaDB reports DEFAULT NULL as the text 'NULL' (and no default as SQL NULL).
        cur = self._exec(
            conn,
            "SELECT COLUMN_NAME, COLUMN_DEFAULT, GENERATION_EXPRESSION "
            "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (self.db_of(table), self.split(table)[1]),
        )
        return sorted(
            r[0]
            for r in cur.fetchall()
            if r[0] in columns and ((r[1] is not None and str(r[1]).upper() != "NULL") or r[2])
        )

    def string_literal(self, value: str) -> str:
        # A backslash means different things with and without NO_BACKSLASH_ESCAPES (and the
        # trigger keeps the sql_mode of its creation): such a value goes in as hex, which reads
        # the same in every mode.
        if "\\" in value:
            return f"_utf8mb4 X'{value.encode().hex()}'"
        return self.lit(value)

    def _value(self, col: Column, alias: str) -> str:
        ref = f"{alias}.{self.q(col.name)}"
        if col.type_name == "bytea":
            return f"HEX({ref})"
        if col.type_name == "timestamp with time zone":
            return f"UNIX_TIMESTAMP({ref})"
        return ref

    def _key_changed(self, key_column: str) -> str:
        return f"NOT (OLD.{self.q(key_column)} <=> NEW.{self.q(key_column)})"

    def base_ddl(self) -> list[str]:
        return [_MY_META.format(meta=self.qmeta), _MY_CHANGELOG.format(cl=self.cl)]

    def table_ddl(self, schema: TableSchema, table: str) -> list[str]:
        ins, upd, dele = (self.q(n) for n in self.trigger_names(table))
        args = self._template_args(schema, table, self.qtable(table))
        bodies = self.filtered_bodies(schema, table)
        if bodies is not None:
            head = "CREATE OR REPLACE TRIGGER {} AFTER {} ON {} FOR EACH ROW\n"
            return [
                head.format(ins, "INSERT", args["t"]) + bodies["I"][0],
                head.format(upd, "UPDATE", args["t"])
                + "BEGIN\n"
                + "".join(f"{b};\n" for b in bodies["U"])
                + "END",
                head.format(dele, "DELETE", args["t"]) + bodies["D"][0],
            ]
        return [
            _MY_INSERT.format(name=ins, **args),
            _MY_UPDATE.format(name=upd, **args),
            _MY_DELETE.format(name=dele, **args),
        ]

    def drop_ddl(self, table: str) -> list[str]:
        db = self.q(self.db_of(table))
        return [f"DROP TRIGGER IF EXISTS {db}.{self.q(n)}" for n in self.trigger_names(table)]

    def present_triggers(self, conn: Any, table: str) -> dict[str, bool]:
        cur = self._exec(
            conn,
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s "
            "AND EVENT_OBJECT_TABLE = %s",
            (self.db_of(table), self.split(table)[1]),
        )
        return {r[0]: True for r in cur.fetchall()}

    def gone_columns(self, conn: Any, table: str) -> list[str]:
        db, n = self.db_of(table), self.split(table)[1]
        names = self.trigger_names(table)
        cur = self._exec(
            conn,
            "SELECT ACTION_STATEMENT FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s "
            "AND EVENT_OBJECT_TABLE = %s AND TRIGGER_NAME IN (%s, %s, %s)",
            (db, n, *names),
        )
        named: dict[str, None] = {}
        for (body,) in cur.fetchall():
            for m in _MY_ROW_COLUMN.finditer(str(body)):
                named[m.group(1).replace("``", "`")] = None
        if not named:
            return []
        cur = self._exec(
            conn,
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
            "AND TABLE_NAME = %s",
            (db, n),
        )
        have = {r[0].lower() for r in cur.fetchall()}  # MariaDB column names ignore case
        return [c for c in named if c.lower() not in have]

    def gone_message(self, table: str, gone: list[str]) -> str:
        cols = ", ".join(repr(c) for c in gone)
        return (
            f"the capture triggers of {table} name column(s) {cols}, which {table} no longer "
            f"has (renamed or dropped): the ERP's INSERT and UPDATE on {table} fail with MariaDB "
            "error 1054 (Unknown column ... in 'NEW'; DELETE too for a key or filtered column) "
            "until `sync-daemon triggers install` is run — right after such DDL (change "
            "capture.keys/filters/columns first if they name the column), or `sync-daemon "
            "triggers uninstall` before it"
        )

    def upsert_meta_sql(self) -> str:
        return (
            f"INSERT INTO {self.qmeta} (table_name, version, definition_hash) VALUES (%s, %s, %s) "
            "ON DUPLICATE KEY UPDATE version = VALUES(version), "
            "definition_hash = VALUES(definition_hash), installed_at = CURRENT_TIMESTAMP(6)"
        )

    def _run_ddl(self, conn: Any, stmts: list[str], metas: list[tuple[str, int, str]]) -> None:
        # MariaDB DDL commits implicitly; CREATE OR REPLACE TRIGGER swaps a trigger under the
        # table's metadata lock, so a reinstall leaves no window in which a write goes unlogged.
        for s in stmts:
            self._exec(conn, s)
        for m in metas:
            self._exec(conn, self.upsert_meta_sql(), m)

    def copy_sql(self, schema: TableSchema, table: str) -> str:
        return self.listed_copy_sql(schema, table, self.qtable(table))

    def chunk_sql(
        self, schema: TableSchema, table: str, after: list[str] | None, limit: int
    ) -> str:
        return self.listed_chunk_sql(schema, table, self.qtable(table), after, limit)

    def copy_from(self, schema: TableSchema, table: str) -> str:
        return self.qtable(table)

    def cascade_children(self, conn: Any, tables: list[str]) -> list[str]:
        """Watched tables whose rows a foreign-key action changes (no trigger fires for those)."""
        watched = {(self.db_of(t), self.split(t)[1]): t for t in tables}
        cur = self._exec(
            conn,
            "SELECT CONSTRAINT_SCHEMA, TABLE_NAME, CONSTRAINT_NAME, DELETE_RULE, UPDATE_RULE "
            "FROM information_schema.REFERENTIAL_CONSTRAINTS "
            "WHERE DELETE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT') "
            "OR UPDATE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT')",
        )
        out = []
        for schema, tname, cname, d_rule, u_rule in cur.fetchall():
            t = watched.get((schema, tname))
            if t is not None:
                out.append(f"{t} ({cname}: ON DELETE {d_rule}, ON UPDATE {u_rule})")
        return sorted(out)


# ---------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------

_LITE_CHANGELOG = """\
CREATE TABLE IF NOT EXISTS {cl} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    tbl TEXT NOT NULL,
    op TEXT NOT NULL,
    row_data TEXT,
    old_key TEXT
)"""

_LITE_META = """\
CREATE TABLE IF NOT EXISTS {meta} (
    table_name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    definition_hash TEXT NOT NULL,
    installed_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
)"""

_LITE_INSERT = (
    "CREATE TRIGGER {name} AFTER INSERT ON {t} BEGIN\n"
    "INSERT INTO {cl} (tbl, op, row_data) VALUES ({tbl}, 'I', {new_image}); END"
)
_LITE_UPDATE = (
    "CREATE TRIGGER {name} AFTER UPDATE ON {t} BEGIN\n"
    "INSERT INTO {cl} (tbl, op, row_data, old_key) VALUES ({tbl}, 'U', {new_image},\n"
    "    CASE WHEN {key_changed} THEN {old_key} END); END"
)
_LITE_DELETE = (
    "CREATE TRIGGER {name} AFTER DELETE ON {t} BEGIN\n"
    "INSERT INTO {cl} (tbl, op, old_key) VALUES ({tbl}, 'D', {old_key}); END"
)


def sqlite_pg_type(declared: str) -> str:
    """SQLite's declared type (affinity rules) as the PostgreSQL name staging mirrors use."""
    t = declared.upper()
    if "INT" in t:
        return "bigint"
    if "BOOL" in t:
        return "boolean"
    if "TIMESTAMP" in t or "DATETIME" in t:
        return "timestamp without time zone"
    if t.startswith("DATE"):
        return "date"
    if any(x in t for x in ("CHAR", "CLOB", "TEXT")) or not t:
        return "text"
    if "BLOB" in t:
        return "bytea"
    if any(x in t for x in ("REAL", "FLOA", "DOUB")):
        return "double precision"
    if "NUMERIC" in t or "DECIMAL" in t:
        inside = declared[declared.find("(") :] if "(" in declared else ""
        return f"numeric{inside}".replace(" ", "")
    return "text"


class SqliteDialect(_ListedColumnsDialect):
    name: DialectName = "sqlite"
    sqlglot_dialect = "sqlite"
    json_object = "json_object"

    def __init__(self, url: str, capture: CaptureSection) -> None:
        super().__init__(url, capture)
        path = make_url(url).database
        if not path:
            raise SchemaError("erp.dsn must name the SQLite file, e.g. sqlite:////var/lib/erp.db")
        self.path = path

    @property
    def cl(self) -> str:
        return self.q(self.changelog)

    @property
    def qmeta(self) -> str:
        return self.q(self.meta)

    def consumer_lock(self) -> Any:
        f = open(f"{self.path}.{self.changelog}.lock", "a")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return None
        return f

    def check_schema(self, table: str) -> str:
        s, n = self.split(table)
        if s not in ("public", "main"):
            raise SchemaError(f"{table}: SQLite triggers watch tables of the main database only")
        return n

    def trigger_names(self, table: str) -> list[str]:
        n = self.split(table)[1]
        return [_short_name(f"{self.changelog}_{n}", sfx) for sfx in ("ins", "upd", "del")]

    def connect(self, role: str, *, autocommit: bool = True) -> Any:
        # Plain sqlite3, not make_engine: the daemon must not switch the ERP's journal mode.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def table_schema(self, conn: Any, table: str) -> TableSchema:
        n = self.check_schema(table)
        rows = conn.execute(f"PRAGMA table_info({self.q(n)})").fetchall()
        if not rows:
            raise SchemaError(f"table {table} not found in the ERP database")
        pk = [r[1] for r in sorted((r for r in rows if r[5]), key=lambda r: r[5])]
        columns = tuple(Column(r[1], sqlite_pg_type(r[2] or ""), 0, not r[3]) for r in rows)
        return self.project(
            table, TableSchema(self.split(table)[0], n, columns, self.key_for(table, pk))
        )

    def filled_columns(self, conn: Any, table: str, columns: list[str]) -> list[str]:
        rows = conn.execute(f"PRAGMA table_xinfo({self.q(self.check_schema(table))})").fetchall()
        # dflt_value (the default's SQL text), or hidden > 0: a generated column
        return sorted(
            r[1]
            for r in rows
            if r[1] in columns and ((r[4] is not None and str(r[4]).upper() != "NULL") or r[6])
        )

    def _value(self, col: Column, alias: str) -> str:
        ref = f"{alias}.{self.q(col.name)}"
        # hex(NULL) is '' in SQLite: keep NULL apart from an empty blob.
        return (
            f"CASE WHEN {ref} IS NULL THEN NULL ELSE hex({ref}) END"
            if col.type_name == "bytea"
            else ref
        )

    def _key_changed(self, key_column: str) -> str:
        return f"OLD.{self.q(key_column)} IS NOT NEW.{self.q(key_column)}"

    def base_ddl(self) -> list[str]:
        return [_LITE_META.format(meta=self.qmeta), _LITE_CHANGELOG.format(cl=self.cl)]

    def table_ddl(self, schema: TableSchema, table: str) -> list[str]:
        names = [self.q(n) for n in self.trigger_names(table)]
        args = self._template_args(schema, table, self.q(schema.name))
        drops = [f"DROP TRIGGER IF EXISTS {n}" for n in names]
        bodies = self.filtered_bodies(schema, table)
        if bodies is not None:
            return [
                *drops,
                *(
                    f"CREATE TRIGGER {name} AFTER {event} ON {args['t']} BEGIN\n"
                    + "".join(f"{b};\n" for b in bodies[op])
                    + "END"
                    for name, event, op in zip(
                        names, ("INSERT", "UPDATE", "DELETE"), "IUD", strict=True
                    )
                ),
            ]
        return [
            *drops,
            _LITE_INSERT.format(name=names[0], **args),
            _LITE_UPDATE.format(name=names[1], **args),
            _LITE_DELETE.format(name=names[2], **args),
        ]

    def drop_ddl(self, table: str) -> list[str]:
        return [f"DROP TRIGGER IF EXISTS {self.q(n)}" for n in self.trigger_names(table)]

    def present_triggers(self, conn: Any, table: str) -> dict[str, bool]:
        n = self.split(table)[1]
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (n,)
        ).fetchall()
        return {r[0]: True for r in rows}

    def upsert_meta_sql(self) -> str:
        return (
            f"INSERT INTO {self.qmeta} (table_name, version, definition_hash) VALUES (?, ?, ?) "
            "ON CONFLICT (table_name) DO UPDATE SET version = excluded.version, "
            "definition_hash = excluded.definition_hash, installed_at = CURRENT_TIMESTAMP"
        )

    def _run_ddl(self, conn: Any, stmts: list[str], metas: list[tuple[str, int, str]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for s in stmts:
                conn.execute(s)
            for m in metas:
                conn.execute(self.upsert_meta_sql(), m)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def copy_sql(self, schema: TableSchema, table: str) -> str:
        return self.listed_copy_sql(schema, table, self.q(schema.name))

    def chunk_sql(
        self, schema: TableSchema, table: str, after: list[str] | None, limit: int
    ) -> str:
        return self.listed_chunk_sql(schema, table, self.q(schema.name), after, limit)


def dialect_for(url: str, capture: CaptureSection, name: str) -> Dialect:
    """The dialect of an ERP URL (``ErpSection.dialect`` gives ``name``)."""
    if name == "postgresql":
        return PostgresDialect(url, capture)
    if name == "mysql":
        return MysqlDialect(url, capture)
    return SqliteDialect(url, capture)
