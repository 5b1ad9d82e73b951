"""The change journal (``sync_journal``) and its consumers' cursors (``sync_cursors``).

Every change applied to a mirror appends an entry (source, table, operation, row key, source
position) in the same staging transaction; consumers — the pushers, the stream sink — read the
entries after their cursor and move the cursor only after the work the entries stand for is
done. A table-level entry has no key: "anything in this table may have changed".

:class:`JournalReader` is the one way to read the journal: a durable cursor plus an in-memory
read position, so entries that wait for a slow consumer are not re-read every cycle. After a
restart the read position starts again at the durable cursor, so at worst entries are looked at
twice; every consumer is idempotent.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from replicator.staging.engine import StagingDb
from replicator.staging.values import key_json

_COPY_THRESHOLD = 500  # entries from which PostgreSQL staging uses COPY
_COLUMNS = "source, table_name, op, row_key, position, at"


class Journal:
    """Appending to, reading and pruning the journal; the consumers' cursors."""

    def __init__(self, db: StagingDb, *, enabled: bool = True) -> None:
        self.db = db
        self.enabled = enabled

    # -- writing (inside an apply transaction) --------------------------------------------------
    def append(
        self, conn: sa.Connection, source: str, entries: Sequence[tuple[str, str, Any, str]]
    ) -> None:
        """Row entries ``(table, op, key tuple, position)``, in ``conn``'s transaction."""
        db = self.db
        now = db.now()
        rows = [(source, t, op, key_json(k), pos, now) for t, op, k, pos in entries]
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
        conn.exec_driver_sql(f"INSERT INTO sync_journal ({_COLUMNS}) {select_sql}", tuple(params))

    def event(self, conn: sa.Connection, source: str, table: str, op: str, position: str) -> None:
        """A table-level entry (no row key): a truncate, a re-copy or a schema change."""
        if not self.enabled:
            return
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
        p = self.db.ph
        sql = (
            "SELECT id, source, table_name, op, row_key, position, at FROM sync_journal "
            f"WHERE id > {p}"
        )
        params: list[Any] = [after]
        if tables:
            sql += f" AND table_name IN ({self.db.phs(len(tables))})"
            params.extend(tables)
        sql += f" ORDER BY id LIMIT {int(limit)}"
        with self.db.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql, tuple(params)).fetchall()
        return [
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

    def last_id(self, tables: Sequence[str]) -> int | None:
        """The newest entry's id among ``tables`` (None when they have none)."""
        with self.db.engine.connect() as conn:
            row = conn.exec_driver_sql(
                f"SELECT MAX(id) FROM sync_journal WHERE table_name IN "
                f"({self.db.phs(len(tables))})",
                tuple(tables),
            ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def backlog(self, consumer: str) -> tuple[int, Any]:
        """How many entries wait for ``consumer``, and when the oldest was committed."""
        with self.db.engine.connect() as conn:
            after = self._cursor(conn, consumer)
            n, oldest = conn.exec_driver_sql(
                f"SELECT COUNT(*), MIN(at) FROM sync_journal WHERE id > {self.db.ph}", (after,)
            ).one()
        return int(n), oldest

    def prune(self, keep_seconds: float) -> int:
        """Delete entries every consumer has read and that are older than ``keep_seconds``."""
        p = self.db.ph
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=keep_seconds)
        with self.db.engine.begin() as conn:
            low = conn.exec_driver_sql("SELECT MIN(journal_id) FROM sync_cursors").scalar()
            sql = f"DELETE FROM sync_journal WHERE at < {p}"
            params: list[Any] = [self.db.to_storage(cutoff)]
            if low is not None:
                sql += f" AND id <= {p}"
                params.append(low)
            return int(conn.exec_driver_sql(sql, tuple(params)).rowcount or 0)

    # -- cursors ----------------------------------------------------------------------------------
    def cursor(self, consumer: str) -> int:
        """``consumer``'s durable cursor (0 when it never committed one)."""
        with self.db.engine.connect() as conn:
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
        with self.db.engine.connect() as conn:
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
        """The next entries after the read position (which then moves past them)."""
        out = self.journal.read(self.read_upto, tables=self.tables or None, limit=limit)
        if out:
            self.read_upto = out[-1]["id"]
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
        last = self.journal.last_id(self.tables)
        return last is None or last <= self.committed
