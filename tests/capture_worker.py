"""A capture process for the kill -9 tests, and the ERP helpers the capture tests share.

Run as ``python tests/capture_worker.py [--batch-size N] MODE ERP_URL STAGING_URL TABLE...``:
starts the capture source of ``MODE`` (``triggers`` or ``logical``) and runs cycles until
SIGTERM/SIGKILL.
Prints ``started`` once the source is started so the test knows the initial copy is done.

Imported by the tests: :func:`make_config`, :func:`install_triggers`, and :class:`Erp` — one ERP database of a dialect
(PostgreSQL, MariaDB, SQLite) with plain DB-API writers that tests drive from threads.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replicator.config import Config, parse_config
from replicator.staging import StagingStore


def make_config(erp_url: str, staging_url: str, tables: list[str], **capture: Any) -> Config:
    """A config for trigger capture of ``tables`` (fast polling for tests)."""
    cap: dict[str, Any] = {"mode": "triggers", "tables": tables, "poll_interval": 0.01}
    cap.update(capture)
    return parse_config({"erp": {"dsn": erp_url}, "capture": cap, "staging": {"url": staging_url}})


def install_triggers(erp_url: str, staging_url: str, tables: list[str], **capture: Any) -> Config:
    """Install (or bring up to date) the capture triggers of ``tables``; the config to capture
    them with (see :func:`make_config`)."""
    from replicator.cdc.triggers.dialects import dialect_for

    cfg = make_config(erp_url, staging_url, tables, **capture)
    d = dialect_for(cfg.erp.url, cfg.capture, cfg.erp.dialect)
    conn = d.connect("test-install")
    try:
        d.install(conn, list(cfg.capture.tables))
    finally:
        conn.close()
    return cfg


class Erp:
    """One ERP database for a test: create, write through DB-API connections, read, drop."""

    def __init__(self, dialect: str, url: str, *, drop: Any = None) -> None:
        self.dialect = dialect
        self.url = url
        self._drop = drop

    # connections: autocommit off for PostgreSQL/MariaDB; SQLite opens transactions explicitly
    def connect(self) -> Any:
        if self.dialect == "postgresql":
            import psycopg

            return psycopg.connect(self.url)
        if self.dialect == "mysql":
            import pymysql
            from sqlalchemy.engine import make_url

            u = make_url(self.url)
            return pymysql.connect(
                host=u.host,
                port=u.port or 3306,
                user=u.username,
                password=u.password or "",
                database=u.database,
                autocommit=False,
            )
        conn = sqlite3.connect(
            self.url.removeprefix("sqlite:///"),
            timeout=30,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def begin(self, conn: Any) -> None:
        if self.dialect == "sqlite":
            conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: Any) -> None:
        if self.dialect == "sqlite":
            conn.execute("COMMIT")
        else:
            conn.commit()

    def rollback(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            if self.dialect == "sqlite":
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                conn.rollback()

    def run(self, conn: Any, sql: str) -> int:
        cur = conn.cursor()
        cur.execute(sql)
        n = cur.rowcount
        cur.close()
        return int(n)

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    def execute(self, *sqls: str) -> None:
        """Run statements in one transaction."""
        with self.session() as conn:
            self.begin(conn)
            for sql in sqls:
                self.run(conn, sql)
            self.commit(conn)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with self.session() as conn:
            cur = conn.cursor()
            cur.execute(sql)
            rows = [tuple(r) for r in cur.fetchall()]
            cur.close()
            self.rollback(conn)
            return rows

    def upsert(self, table: str, cols: str, values: str, update: str) -> str:
        """An insert-or-update statement of the dialect (conflict on ``id``)."""
        if self.dialect == "mysql":
            return (
                f"INSERT INTO {table} ({cols}) VALUES ({values}) ON DUPLICATE KEY UPDATE {update}"
            )
        return (
            f"INSERT INTO {table} ({cols}) VALUES ({values}) "
            f"ON CONFLICT (id) DO UPDATE SET {update}"
        )

    def drop(self) -> None:
        if self._drop is not None:
            self._drop()


def new_mysql_db(base_url: str) -> Erp:
    """A uniquely named MariaDB database (dropped by ``Erp.drop``)."""
    import pymysql
    from sqlalchemy.engine import make_url

    u = make_url(base_url)
    name = f"erp_{uuid.uuid4().hex[:10]}"

    def admin(sql: str) -> None:
        c = pymysql.connect(
            host=u.host,
            port=u.port or 3306,
            user=u.username,
            password=u.password or "",
            autocommit=True,
        )
        try:
            c.cursor().execute(sql)
        finally:
            c.close()

    admin(f"CREATE DATABASE `{name}`")
    url = f"mysql://{u.username}@{u.host}:{u.port or 3306}/{name}"
    return Erp("mysql", url, drop=lambda: admin(f"DROP DATABASE IF EXISTS `{name}`"))


def new_sqlite_db(path: Path) -> Erp:
    """An SQLite ERP file in WAL mode (as an embedded application would run it)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return Erp("sqlite", f"sqlite:///{path}")


def erp_of(dialect: str, request: Any, tmp_path: Path) -> Iterator[Erp]:
    """A fixture's body: one ERP database of ``dialect`` (``postgresql``, ``mysql``, ``sqlite``)
    for the test ``request`` belongs to, dropped afterwards."""
    if dialect == "postgresql":
        yield Erp("postgresql", request.getfixturevalue("erp_db"))
    elif dialect == "mysql":
        erp = new_mysql_db(request.getfixturevalue("mariadb_url"))
        try:
            yield erp
        finally:
            erp.drop()
    else:
        yield new_sqlite_db(tmp_path / "erp.db")


def build_source(mode: str, cfg: Config, store: StagingStore, stop: threading.Event) -> Any:
    if mode == "triggers":
        from replicator.cdc.triggers import TriggerSource

        return TriggerSource(cfg, store, stop)
    if mode == "logical":
        from replicator.cdc.logical import LogicalSource

        capture = cfg.capture.model_copy(update={"mode": "logical", "batch_ms": 20})
        return LogicalSource(cfg.model_copy(update={"capture": capture}), store)
    raise SystemExit(f"unknown capture mode {mode!r}")


def main(argv: list[str]) -> int:
    capture: dict[str, Any] = {}
    if argv[:1] == ["--batch-size"]:
        capture["batch_size"] = int(argv[1])
        argv = argv[2:]
    mode, erp_url, staging_url, *tables = argv
    cfg = make_config(erp_url, staging_url, tables, **capture)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = StagingStore(staging_url)
    src = build_source(mode, cfg, store, stop)
    try:
        src.start()
        print("started", flush=True)
        while not stop.is_set():
            src.run_cycle(0.2, stop)
    finally:
        src.close()
        store.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
