"""The change journal (``sync_journal``) and its consumers' cursors (``sync_cursors``).

Every change applied to a mirror appends an entry (source, table, operation, row key, source
position) in the same staging transaction; consumers — the pushers, the stream sink — read the
entries after their cursor and move the cursor only after the work the entries stand for is
done. A table-level entry has no key: "anything in this table may have changed".

:class:`JournalReader` is the one way to read the journal: a durable cursor plus an in-memory
read position, so entries that wait for a slow consumer are not re-read every cycle. After a
restart the read position starts again at the durable cursor, so at worst entries are looked at
twice; every consumer is idempotent.

Why the journal is shaped the way it is
---------------------------------------
Every journaled change pays for the journal, so it is one append-only table read by position
(the entry id) and nothing else: no secondary index (readers of some tables scan forward from
their position with the primary key, and remember how far they scanned, see :meth:`Journal.scan`),
and on SQLite no AUTOINCREMENT (its ``sqlite_sequence`` row is rewritten by every insert). An
entry then costs less than half the CPU it cost with both (``bench/apply.py`` measures the
two shapes).

Without AUTOINCREMENT SQLite gives a new row the largest rowid in the table plus one, so ids
would repeat if the newest entries were ever deleted — and a consumer whose cursor stands past
the largest surviving id would skip the entries that reuse its ids. :meth:`Journal.prune`
therefore never deletes the newest entry: the largest id survives, and ids only grow. A staging
store made by an earlier version is upgraded once by :func:`upgrade` (in setup): the index is
dropped and the SQLite table rebuilt with the same ids.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.db import reading
from replicator.staging.engine import StagingDb
from replicator.staging.schema import OLD_JOURNAL_INDEX, journal_ddl
from replicator.staging.values import key_json

log = structlog.get_logger(__name__)

_COPY_THRESHOLD = 500  # entries from which PostgreSQL staging uses COPY
_COLUMNS = "source, table_name, op, row_key, position, at"
# The advisory lock that keeps journal ids in commit order on PostgreSQL staging (see
# Journal._in_commit_order); any constant works as long as nothing else takes it.
_JOURNAL_LOCK = 0x73796E636A726E6C  # "syncjrnl"


def upgrade(conn: sa.Connection, dialect: str) -> None:
    """Bring a journal of an earlier version to today's shape, in ``conn``'s transaction (setup,
    after the system tables' DDL). Idempotent and cheap when there is nothing to do.

    On SQLite an AUTOINCREMENT table is rebuilt with the same ids, unless its newest entries
    were pruned by an earlier version (``sqlite_sequence`` ahead of the largest id): only
    AUTOINCREMENT remembers that high-water mark, so the table keeps its shape (read the same
    way) until an entry past the mark is journaled — pruning never deletes the newest entry —
    and a later setup rebuilds it.
    """
    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {OLD_JOURNAL_INDEX}")
    if dialect != "sqlite":
        return
    sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'sync_journal'"
    ).scalar()
    if not sql or "AUTOINCREMENT" not in str(sql).upper():
        return
    seq = conn.exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'sync_journal'"
    ).scalar()
    top = conn.exec_driver_sql("SELECT MAX(id) FROM sync_journal").scalar()
    if seq is not None and int(seq) > int(top or 0):
        log.info("journal_upgrade_deferred", high_water=int(seq), largest_id=top)
        return
    conn.exec_driver_sql("ALTER TABLE sync_journal RENAME TO _sync_journal_old")
    conn.exec_driver_sql(journal_ddl(dialect))
    conn.exec_driver_sql(
        f"INSERT INTO sync_journal (id, {_COLUMNS}) SELECT id, {_COLUMNS} FROM _sync_journal_old"
    )
    conn.exec_driver_sql("DROP TABLE _sync_journal_old")
    log.info("journal_upgraded", largest_id=top)


class Journal:
    """Appending to, reading and pruning the journal; the consumers' cursors."""

    def __init__(self, db: StagingDb, *, enabled: bool = True) -> None:
        self.db = db
        self.enabled = enabled

    def upgrade(self, conn: sa.Connection) -> None:
        """See :func:`upgrade` (store setup, in its transaction)."""
        upgrade(conn, self.db.dialect)

    # -- writing (inside an apply transaction) --------------------------------------------------
    def _in_commit_order(self, conn: sa.Connection) -> None:
        """On PostgreSQL, hold the journal's transaction-level advisory lock until ``conn``'s
        transaction ends, before it takes journal ids.

        Readers go by id and a consumer's cursor is an id, so an entry must never become
        visible after an entry with a larger id: the consumer would already have moved past it.
        A sequence hands out ids when rows are inserted, not when they commit, so two
        transactions appending at once (two capture sources on one staging database, or an
        apply transaction and a schema event) could commit in the other order. With the lock
        the second waits for the first's commit before it draws ids. On SQLite one writer at a
        time already gives that order. Taking the lock again in the same transaction is cheap
        and harmless (it stacks and is released at commit or rollback).
        """
        if self.db.dialect == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (_JOURNAL_LOCK,))

    def append(
        self,
        conn: sa.Connection,
        source: str,
        groups: Sequence[tuple[str, str, Sequence[tuple[Any, str]]]],
    ) -> None:
        """Row entries, in ``conn``'s transaction and in the order given: per group
        ``(table, op, [(key tuple, position), …])`` (a key of None: a table-level entry)."""
        db = self.db
        self._in_commit_order(conn)
        now = db.now()
        rows = [
            (source, t, op, key_json(k), pos, now) for t, op, pairs in groups for k, pos in pairs
        ]
        if db.dialect == "postgresql" and len(rows) >= _COPY_THRESHOLD:
            dbapi = conn.connection.driver_connection
            assert dbapi is not None
            cur = dbapi.cursor()
            try:
                with cur.copy(f"COPY sync_journal ({_COLUMNS}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            finally:
                cur.close()
        else:
            db.executemany(
                conn, f"INSERT INTO sync_journal ({_COLUMNS}) VALUES ({db.phs(6)})", rows
            )

    def append_select(self, conn: sa.Connection, select_sql: str, params: Sequence[Any]) -> None:
        """Entries from a query returning the journal's columns in order (the spill's replay)."""
        self._in_commit_order(conn)
        conn.exec_driver_sql(f"INSERT INTO sync_journal ({_COLUMNS}) {select_sql}", tuple(params))

    def event(self, conn: sa.Connection, source: str, table: str, op: str, position: str) -> None:
        """A table-level entry (no row key): a truncate, a re-copy or a schema change."""
        if not self.enabled:
            return
        self._in_commit_order(conn)
        p = self.db.ph
        conn.exec_driver_sql(
            f"INSERT INTO sync_journal ({_COLUMNS}) VALUES ({p}, {p}, {p}, NULL, {p}, {p})",
            (source, table, op, position, self.db.now()),
        )

    # -- reading ----------------------------------------------------------------------------------
    def read(
        self, after: int, *, tables: Sequence[str] | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Entries after journal id ``after`` (of ``tables``, or all), oldest first."""
        return self.scan(after, tables=tables, limit=limit)[0]

    def scan(
        self, after: int, *, tables: Sequence[str] | None = None, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], int]:
        """Entries after journal id ``after`` (of ``tables``, or all), oldest first, and the id
        up to which the journal was looked at: a reader of some tables moves past entries of
        other tables once, instead of scanning them again at every read (there is no index by
        table).

        On SQLite the scan reaches the newest committed entry: one writer at a time, so an
        entry not yet committed always gets a larger id than every committed one. On
        PostgreSQL writers take ids in commit order too (:meth:`_in_commit_order`), but the
        scan still reaches only the last entry returned, as reading always did.
        """
        p = self.db.ph
        sql = (
            "SELECT id, source, table_name, op, row_key, position, at FROM sync_journal "
            f"WHERE id > {p}"
        )
        params: list[Any] = [after]
        bounded = self.db.dialect == "sqlite"
        with reading(self.db.engine) as conn:
            top = None
            if bounded:
                top = conn.exec_driver_sql("SELECT MAX(id) FROM sync_journal").scalar()
                if top is None or int(top) <= after:
                    return [], after
                sql += f" AND id <= {p}"
                params.append(int(top))
            if tables:
                sql += f" AND table_name IN ({self.db.phs(len(tables))})"
                params.extend(tables)
            sql += f" ORDER BY id LIMIT {int(limit)}"
            rows = conn.exec_driver_sql(sql, tuple(params)).fetchall()
        entries = [
            {
                "id": int(r[0]),
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
        if len(entries) == limit or top is None:
            return entries, entries[-1]["id"] if entries else after
        return entries, int(top)

    def any_after(self, after: int, tables: Sequence[str] = ()) -> bool:
        """Whether an entry (of ``tables``, or any) lies past journal id ``after``."""
        p = self.db.ph
        sql = f"SELECT id FROM sync_journal WHERE id > {p}"
        if tables:
            sql += f" AND table_name IN ({self.db.phs(len(tables))})"
        with reading(self.db.engine) as conn:
            row = conn.exec_driver_sql(f"{sql} LIMIT 1", (after, *tables)).fetchone()
        return row is not None

    def backlog(self, consumer: str) -> tuple[int, Any]:
        """How many entries wait for ``consumer``, and when the oldest was committed."""
        with reading(self.db.engine) as conn:
            after = self._cursor(conn, consumer)
            n, oldest = conn.exec_driver_sql(
                f"SELECT COUNT(*), MIN(at) FROM sync_journal WHERE id > {self.db.ph}", (after,)
            ).one()
        return int(n), oldest

    def prune(self, keep_seconds: float) -> int:
        """Delete entries every consumer has read and that are older than ``keep_seconds`` —
        never the newest entry, whose id keeps SQLite from handing out used ids again."""
        p = self.db.ph
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=keep_seconds)
        with self.db.engine.begin() as conn:
            low = conn.exec_driver_sql("SELECT MIN(journal_id) FROM sync_cursors").scalar()
            sql = (
                f"DELETE FROM sync_journal WHERE at < {p} "
                "AND id < (SELECT MAX(id) FROM sync_journal)"
            )
            params: list[Any] = [self.db.to_storage(cutoff)]
            if low is not None:
                sql += f" AND id <= {p}"
                params.append(low)
            return int(conn.exec_driver_sql(sql, tuple(params)).rowcount or 0)

    # -- cursors ----------------------------------------------------------------------------------
    def cursor(self, consumer: str) -> int:
        """``consumer``'s durable cursor (0 when it never committed one)."""
        with reading(self.db.engine) as conn:
            return self._cursor(conn, consumer)

    def _cursor(self, conn: sa.Connection, consumer: str) -> int:
        row = conn.exec_driver_sql(
            f"SELECT journal_id FROM sync_cursors WHERE consumer = {self.db.ph}", (consumer,)
        ).fetchone()
        return int(row[0]) if row else 0

    def commit(self, consumer: str, journal_id: int) -> None:
        """Move ``consumer``'s cursor (after its work for entries up to ``journal_id`` is done)."""
        p = self.db.ph
        with self.db.engine.begin() as conn:
            n = conn.exec_driver_sql(
                f"UPDATE sync_cursors SET journal_id = {p}, updated_at = {p} WHERE consumer = {p}",
                (journal_id, self.db.now(), consumer),
            ).rowcount
            if not n:
                conn.exec_driver_sql(
                    "INSERT INTO sync_cursors (consumer, journal_id, updated_at) "
                    f"VALUES ({p}, {p}, {p})",
                    (consumer, journal_id, self.db.now()),
                )

    def consumers(self) -> list[str]:
        """The names of the journal's consumers (pushers, the stream sink)."""
        with reading(self.db.engine) as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT consumer FROM sync_cursors")]


class JournalReader:
    """One consumer's view of the journal: entries of some tables (or all), oldest first, read
    forward from an in-memory position; the durable cursor moves only with :meth:`commit`."""

    def __init__(self, journal: Journal, consumer: str, tables: Sequence[str] = ()) -> None:
        self.journal = journal
        self.consumer = consumer
        self.tables = list(tables)
        self.committed = journal.cursor(consumer)
        self.read_upto = self.committed

    def read(self, limit: int) -> list[dict[str, Any]]:
        """The next entries after the read position (which then moves past them, and past the
        entries of other tables looked at on the way)."""
        out, self.read_upto = self.journal.scan(
            self.read_upto, tables=self.tables or None, limit=limit
        )
        return out

    def commit(self, journal_id: int) -> bool:
        """Move the durable cursor forward to ``journal_id`` (never backwards)."""
        if journal_id <= self.committed:
            return False
        self.journal.commit(self.consumer, journal_id)
        self.committed = journal_id
        return True

    def caught_up(self) -> bool:
        """Whether nothing of the reader's tables lies past the durable cursor."""
        return not self.journal.any_after(self.committed, self.tables)
