"""Incremental snapshots while the stream goes on: tables added to capture, ``resync --table``.

A table that joins capture after the slot's exported snapshot (added to ``capture.tables``, or
re-added after a while out) has rows the stream will never send. They are copied here in
key-ordered chunks on the ERP's ordinary connection — no long transaction, no lock beyond a short
``SELECT … ORDER BY key LIMIT n`` — while capture keeps streaming, with the watermark scheme of
Netflix's DBLog (Debezium's incremental snapshots work the same way):

1. emit a *low* watermark into the WAL (``pg_logical_emit_message``, non-transactional: it is
   decoded where it is written, not at a commit);
2. select the next chunk of rows after the last copied key;
3. emit a *high* watermark.

Every transaction that committed before the low watermark reaches the stream before it, and the
chunk already shows its effect. A transaction whose commit falls between the two watermarks may
or may not be visible to the chunk, so while the stream is between them, a key it touches is
taken out of the chunk (a delete or a full new row image) or has the chunk row brought up to date
(an update that left unchanged TOAST columns out: the chunk row holds those columns, the stream
the new values of the others). At the high watermark what is left of the chunk is applied like
any change, in the staging transaction that also records the copy's progress with the
checkpoint. A transaction after the high watermark arrives later in the stream and wins. So a
chunk never overwrites a newer change and nothing is missed.

Progress (table, last copied key, rows copied, rows to copy) travels in the checkpoint's
``extra`` and commits with the data: after a kill -9 the copy resumes after the last chunk
applied. Watermarks of an earlier process (replayed after a restart) carry another chunk id and
are ignored.

A re-copy of a table whose mirror has rows (``resync --table``, a table re-added) must also
remove rows the source no longer has; it copies into a fresh *shadow* mirror that the stream
feeds alongside the live one, and swaps it in when the copy is complete (readers keep the old
mirror until then). The queue of tables, shadows, requests, the journal event and progress are
kept by :mod:`replicator.cdc.copies`, as for trigger capture; this module reads the chunks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from replicator.cdc.copies import OnlineCopies, TableCopy
from replicator.changes import TableSchema

SNAPSHOT_PREFIX = "sync-daemon-snapshot"


@dataclass
class Chunk:
    """Rows selected between a low and a high watermark, keyed by their key tuple."""

    id: str
    copy: TableCopy
    rows: dict[tuple[Any, ...], dict[str, Any]]
    last_key: list[str] | None  # key of the last selected row (text), even if taken out later
    selected: int
    complete: bool  # fewer rows than asked for: the table is done after this chunk
    in_window: bool = False
    taken_out: set[tuple[Any, ...]] = field(default_factory=set)


class IncrementalSnapshots:
    """The chunk in flight and its watermarks, for one logical capture source; the queue of
    tables to copy, their shadows and progress are :class:`OnlineCopies`'."""

    def __init__(self, slot: str, chunk_rows: int, copies: OnlineCopies) -> None:
        self.prefix = f"{SNAPSHOT_PREFIX}:{slot}"
        self.chunk_rows = chunk_rows
        self.copies = copies
        self.chunk: Chunk | None = None
        # Per table, the column list and row filter the publication applies (persisted, so a
        # change of either is noticed at the next start and the table copied again).
        self.specs: dict[str, dict[str, Any]] = {}
        # Test seam: called between the chunk's SELECT and its high watermark, where an ERP
        # write is "in the window" and the chunk may hold an older row than the stream.
        self.after_select: Callable[[], None] | None = None

    # ---------------------------------------------------------------- state
    def load(
        self, extra: dict[str, Any], schemas: dict[str, TableSchema], had_mirror: set[str]
    ) -> None:
        """Restore from the checkpoint's ``extra`` and queue every configured table not copied.

        A checkpoint written before incremental snapshots existed has no ``copied`` list: the
        tables that already had a mirror were copied by the initial snapshot.
        """
        copies = self.copies
        copied = extra.get("copied")
        copies.copied = set(copied if copied is not None else had_mirror) & set(schemas)
        queue = [c for c in copies.stored(extra, schemas) if c.table not in copies.copied]
        for table in schemas:
            if table not in copies.copied and all(c.table != table for c in queue):
                # A mirror with rows (a table that was captured before) is re-copied through a
                # shadow, so rows deleted meanwhile in the ERP disappear from staging too.
                queue.append(TableCopy(table, shadow=table in had_mirror))
        copies.set(queue)
        self.chunk = None

    def to_extra(self) -> dict[str, Any]:
        return {
            "copied": sorted(self.copies.copied),
            "copying": self.copies.to_json(),
            "specs": self.specs,
        }

    def drop_stale_chunk(self) -> None:
        """Forget the chunk in flight if its copy was started over (a re-copy of its table was
        queued: the chunk holds the old shape, or the copy begins again from the first key)."""
        if self.chunk is not None and all(c is not self.chunk.copy for c in self.copies.queue):
            self.chunk = None

    @property
    def active(self) -> bool:
        return self.copies.active

    # ---------------------------------------------------------------- chunks
    def start_chunk(
        self, conn: psycopg.Connection[Any], schema: TableSchema, row_filter: str | None = None
    ) -> None:
        """Low watermark, select the next chunk (rows the publication's row filter lets through),
        high watermark."""
        copy = self.copies.queue[0]
        cond = sql.SQL("({})").format(sql.SQL(row_filter)) if row_filter else None
        if copy.total == 0 and copy.after is None:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}{}").format(
                    sql.Identifier(schema.schema, schema.name),
                    sql.SQL(" WHERE {}").format(cond) if cond else sql.SQL(""),
                )
            ).fetchone()
            self.copies.started(copy, int(row[0]) if row else 0)
        chunk_id = uuid.uuid4().hex
        cols = [c.name for c in schema.columns]
        key = schema.key
        types = {c.name: c.type_name for c in schema.columns}
        query = sql.SQL("SELECT {cols}, {keytext} FROM {table}").format(
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in cols),
            keytext=sql.SQL(", ").join(
                sql.SQL("{}::text AS {}").format(
                    sql.Identifier(k), sql.Identifier(f"_sync_key_{i}")
                )
                for i, k in enumerate(key)
            ),
            table=sql.Identifier(schema.schema, schema.name),
        )
        params: list[Any] = []
        # The chunk query has parameters: a % of the filter (modulo) must not read as one.
        where: list[sql.Composable] = (
            [sql.SQL("({})").format(sql.SQL(row_filter.replace("%", "%%")))] if row_filter else []
        )
        if copy.after is not None:
            where.append(
                sql.SQL("({}) > ({})").format(
                    sql.SQL(", ").join(sql.Identifier(k) for k in key),
                    sql.SQL(", ").join(
                        sql.SQL("CAST(%s AS {})").format(sql.SQL(types[k])) for k in key
                    ),
                )
            )
            params.extend(copy.after)
        if where:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        query += sql.SQL(" ORDER BY {} LIMIT {}").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in key), sql.Literal(self.chunk_rows)
        )
        self._emit(conn, f"low:{chunk_id}")
        fetched = conn.execute(query, params).fetchall()
        if self.after_select is not None:
            self.after_select()
        self._emit(conn, f"high:{chunk_id}")
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        last: list[str] | None = copy.after
        n = len(cols)
        for r in fetched:
            values = dict(zip(cols, r[:n], strict=True))
            rows[tuple(values[k] for k in key)] = values
            last = [str(v) for v in r[n:]]
        self.chunk = Chunk(
            id=chunk_id,
            copy=copy,
            rows=rows,
            last_key=last,
            selected=len(fetched),
            complete=len(fetched) < self.chunk_rows,
        )

    def _emit(self, conn: psycopg.Connection[Any], content: str) -> None:
        conn.execute("SELECT pg_logical_emit_message(false, %s, %s)", (self.prefix, content))

    def on_message(self, content: str) -> Chunk | None:
        """A watermark came through the stream; the chunk to apply now, at its high watermark."""
        chunk = self.chunk
        kind, _, chunk_id = content.partition(":")
        if chunk is None or chunk_id != chunk.id:
            return None  # a watermark of an earlier process or chunk
        if kind == "low":
            chunk.in_window = True
            return None
        if kind == "high" and chunk.in_window:
            self.chunk = None
            return chunk
        return None

    def on_change(
        self, table: str, key: tuple[Any, ...], values: dict[str, Any] | None, partial: bool
    ) -> None:
        """A streamed change between the watermarks: the chunk must not overwrite it."""
        chunk = self.chunk
        if chunk is None or not chunk.in_window or chunk.copy.table != table:
            return
        row = chunk.rows.get(key)
        if partial and values is not None and row is not None:
            row.update(values)  # the chunk row keeps the unchanged TOAST columns
            return
        if chunk.rows.pop(key, None) is not None:
            chunk.taken_out.add(key)

    def on_truncate(self, table: str) -> None:
        """The table was truncated: nothing the chunk selected can be applied any more."""
        chunk = self.chunk
        if chunk is not None and chunk.in_window and chunk.copy.table == table:
            chunk.taken_out.update(chunk.rows)
            chunk.rows.clear()
