"""The staging database connection: one engine per staging URL per process, and the dialect
helpers (identifier quoting, parameter style, timestamps) every staging module writes SQL with.

The store, the order ledger, the log store, the pushers and the lag history all write into the
same database; they share one pool (:func:`shared_engine`) instead of each building its own, so
a process holds one set of staging connections and one place configures them. The HA lease is
the one exception, on purpose: its engine has short timeouts and is never fenced (it is what
fences; see :mod:`replicator.ha`).
"""

from __future__ import annotations

import datetime as dt
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from replicator.db import make_engine
from replicator.staging.values import scalar_text

# Engines by URL, held while any user holds one (a test's store that is dropped frees its pool).
_ENGINES: weakref.WeakValueDictionary[str, sa.Engine] = weakref.WeakValueDictionary()
_ENGINES_LOCK = threading.Lock()

# The shared pool replaces two of the default size (staging, order ledger): the same ceiling.
_POOL = {"pool_size": 10, "max_overflow": 20}


def _shareable(url: str) -> bool:
    """An in-memory SQLite database lives in its connection: every user gets its own."""
    u = sa.engine.make_url(url)
    return not (u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:"))


def shared_engine(url: str, role: str = "staging") -> sa.Engine:
    """The process's engine for the staging database at ``url`` (made on first use; ``role``
    names the connections of the first user, as ``application_name`` on PostgreSQL)."""
    if not _shareable(url):
        return make_engine(url, role)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            engine = make_engine(url, role, **_POOL)
            _ENGINES[url] = engine
        return engine


class StagingDb:
    """The staging engine and how SQL is written for its dialect."""

    def __init__(self, engine: sa.Engine, url: str | None = None) -> None:
        self.engine = engine
        self.url = url if url is not None else engine.url.render_as_string(hide_password=False)
        self.dialect = engine.dialect.name

    def q(self, ident: str) -> str:
        """Quote an identifier for the staging dialect."""
        return self.engine.dialect.identifier_preparer.quote_identifier(ident)

    @property
    def ph(self) -> str:
        """The driver's parameter placeholder (``?`` for SQLite, ``%s`` for psycopg)."""
        return "?" if self.dialect == "sqlite" else "%s"

    def phs(self, n: int) -> str:
        """``n`` placeholders separated by commas."""
        return ", ".join([self.ph] * n)

    def now(self) -> Any:
        """The current time as a system-table timestamp value."""
        now = dt.datetime.now(dt.UTC)
        return now.isoformat(sep=" ") if self.dialect == "sqlite" else now

    def to_storage(self, v: Any) -> Any:
        """A value for a system-table column (PostgreSQL takes Python values as they are)."""
        return scalar_text(v) if self.dialect == "sqlite" else v

    @staticmethod
    def executemany(conn: sa.Connection, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """One driver-level ``executemany`` in ``conn``'s transaction (no SQLAlchemy per-row
        overhead: the apply path and the pushers write thousands of rows at once)."""
        dbapi = conn.connection.driver_connection
        assert dbapi is not None
        cur = dbapi.cursor()
        try:
            cur.executemany(sql, list(rows))
        finally:
            cur.close()
