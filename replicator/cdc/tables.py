"""The tables logical capture watches, as the ERP's catalog describes them.

For each entry of ``capture.tables``: its columns (with catalog numbers, so a renamed column
is recognised later), the key staging uses (primary key, replica identity index, or
``capture.keys`` with REPLICA IDENTITY FULL), and the column list and row filter checked
against what PostgreSQL will accept — all problems named together in one
:class:`~replicator.errors.SchemaError` before anything is created. Used by logical capture at
start and by ``preflight``.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog

from replicator.changes import Column, TableSchema
from replicator.config import Config
from replicator.config.core import filter_columns
from replicator.errors import SchemaError

log = structlog.get_logger(__name__, service="capture")


def describe_tables(conn: psycopg.Connection[Any], cfg: Config) -> list[TableSchema]:
    """Describe the watched tables, with the key staging uses, or raise SchemaError."""
    out: list[TableSchema] = []
    problems: list[str] = []
    for table in cfg.capture.tables:
        schema, name = table.split(".")
        row = conn.execute(
            "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, name),
        ).fetchone()
        if row is None:
            problems.append(f"capture.tables: {table!r} does not exist in the ERP database")
            continue
        oid, ident = row
        cols = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, NOT a.attnotnull, "
            "a.attnum FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 "
            "AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            (oid,),
        ).fetchall()
        columns = tuple(Column(n, t, int(o), bool(nl), int(num)) for n, t, o, nl, num in cols)
        pk = [
            r[0]
            for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord",
                (oid,),
            ).fetchall()
        ]
        configured = cfg.capture.key_columns(table)
        if ident == "i" and not pk:
            pk = [
                r[0]
                for r in conn.execute(
                    "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
                    "ON true JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                    "WHERE i.indrelid = %s AND i.indisreplident ORDER BY k.ord",
                    (oid,),
                ).fetchall()
            ]
        if configured:
            unknown = [c for c in configured if not any(col.name == c for col in columns)]
            if unknown:
                problems.append(f"capture.keys.{table}: no column {unknown[0]!r} in {table}")
                continue
            if not pk and ident != "f":
                problems.append(
                    f"{table} has no primary key: capture.keys names its key, but PostgreSQL only "
                    f"publishes its updates and deletes with REPLICA IDENTITY FULL. Run: "
                    f"ALTER TABLE {table} REPLICA IDENTITY FULL"
                )
                continue
            key = tuple(configured)
        elif pk:
            key = tuple(pk)
        elif ident == "f":
            key = tuple(c.name for c in columns if c.type_name not in ("json", "jsonb", "bytea"))
            log.warning(
                "table_keyed_by_all_columns",
                table=table,
                hint="set capture.keys for this table; identical rows collapse into one",
            )
        else:
            problems.append(
                f"{table} has no primary key: add one, or run ALTER TABLE {table} REPLICA IDENTITY FULL "
                f"and name its key columns in capture.keys"
            )
            continue
        wanted = cfg.capture.column_list(table)
        if wanted is not None:
            unknown = [c for c in wanted if not any(col.name == c for col in columns)]
            if unknown:
                problems.append(f"capture.columns.{table}: no column {unknown[0]!r} in {table}")
                continue
            missing = [k for k in key if k not in wanted]
            if missing:
                problems.append(
                    f"capture.columns.{table} must include the key column(s) {', '.join(missing)}"
                )
                continue
            if ident == "f" and len(wanted) < len(columns):
                problems.append(
                    f"capture.columns.{table}: {table} has REPLICA IDENTITY FULL, and PostgreSQL "
                    "then refuses updates and deletes unless the column list names every column"
                )
                continue
            columns = tuple(c for c in columns if c.name in wanted)
        cond = cfg.capture.row_filter(table)
        if cond is not None:
            outside = [c for c in filter_columns(table, cond) if c not in key]
            if outside and ident != "f":
                # PostgreSQL would refuse every UPDATE and DELETE on the ERP table (a row
                # filter may only read replica identity columns): never let that happen.
                problems.append(
                    f"capture.filters.{table} reads {', '.join(outside)}, which is not part of the "
                    f"replica identity ({', '.join(key)}): PostgreSQL would then refuse updates "
                    f"and deletes on {table}. Filter on key columns, or run ALTER TABLE {table} "
                    "REPLICA IDENTITY FULL (and list no columns for it)"
                )
                continue
        out.append(TableSchema(schema, name, columns, key))
    if problems:
        raise SchemaError("; ".join(problems))
    return out
