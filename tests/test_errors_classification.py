"""The contract of :mod:`replicator.errors_map`: real errors, provoked from real servers, and what
they are classified as.

Every case is an error a driver really raised — PostgreSQL (psycopg, bare and through SQLAlchemy),
MariaDB (PyMySQL through SQLAlchemy), SQLite (sqlite3, bare and through SQLAlchemy) and a loopback
HTTP server (httpx, bare and through the connectors' ``ShopHttp``) — never an exception built by
hand, so a driver that changes how it reports a failure breaks this test, not production.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pymysql
import pytest
import sqlalchemy as sa
from psycopg import pq

from replicator.connectors._http import ShopHttp
from replicator.connectors.base import ShopError, ShopUnavailable
from replicator.db import connect_error, make_engine
from replicator.errors import (
    AccessError,
    DaemonAlreadyRunning,
    FatalError,
    RetryableError,
    SchemaError,
    SlotMissingError,
    SyncError,
)
from replicator.errors_map import (
    classify,
    is_access_refused,
    is_retryable,
    is_schema_mismatch,
    is_unique_violation,
    replication_start_error,
)
from replicator.localpg import free_port


@dataclass(frozen=True)
class Expect:
    """What one real error must be classified as."""

    cls: type[SyncError]
    retryable: bool
    access: bool = False
    schema: bool = False
    unique: bool = False


def _raised(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no error was raised")


def _check(exc: BaseException, expect: Expect) -> None:
    got = Expect(
        classify(exc),
        is_retryable(exc),
        is_access_refused(exc),
        is_schema_mismatch(exc),
        is_unique_violation(exc),
    )
    assert got == expect, f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


FATAL = Expect(FatalError, retryable=False)
UNIQUE = Expect(FatalError, retryable=False, unique=True)
SCHEMA = Expect(SchemaError, retryable=False, schema=True)
RETRY = Expect(RetryableError, retryable=True)
# Refused access is not the work's fault: is_retryable says yes (an order waits for the DBA's fix),
# and classify puts it first as AccessError (capture stops and says so, exit 4).
ACCESS = Expect(AccessError, retryable=True, access=True)


# --- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture
def pg(erp_db: str) -> Iterator[str]:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE item (sku text PRIMARY KEY, qty int NOT NULL)")
        c.execute("INSERT INTO item VALUES ('A', 1)")
    yield erp_db


def _pg_dsn(url: str, **parts: Any) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    return psycopg.conninfo.make_conninfo(**{**info, **parts})


def test_postgresql_connection_failures(pg: str) -> None:
    refused = _raised(lambda: psycopg.connect(_pg_dsn(pg, port=free_port()), connect_timeout=3))
    _check(refused, RETRY)
    assert isinstance(connect_error("ERP", "here", refused), RetryableError)
    # libpq gives a failed connection no SQLSTATE: these two are recognised by the server's text.
    no_db = _raised(lambda: psycopg.connect(_pg_dsn(pg, dbname=f"nope_{uuid.uuid4().hex[:6]}")))
    _check(no_db, ACCESS)
    assert isinstance(connect_error("ERP", "here", no_db), AccessError)
    no_role = _raised(lambda: psycopg.connect(_pg_dsn(pg, user="no_such_role")))
    _check(no_role, ACCESS)
    # The same through SQLAlchemy (the order import and the trigger capture connect this way).
    engine = make_engine(pg.rsplit("/", 1)[0] + "/nope_db", "test")
    try:
        _check(_raised(engine.connect), ACCESS)
    finally:
        engine.dispose()
    dead = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/x", "test")
    try:
        _check(_raised(dead.connect), RETRY)
    finally:
        dead.dispose()


def test_postgresql_statement_errors(pg: str) -> None:
    engine = make_engine(pg, "test")
    try:
        with engine.connect() as conn:

            def run(sql: str) -> BaseException:
                exc = _raised(lambda: conn.exec_driver_sql(sql))
                conn.rollback()
                return exc

            _check(run("INSERT INTO item VALUES ('A', 2)"), UNIQUE)
            # The undefined column's message says "does not exist", like a missing database; its
            # SQLSTATE (42703) says what it is.
            _check(run("SELECT nope FROM item"), SCHEMA)
            _check(run("SELECT * FROM no_table"), SCHEMA)
            _check(run("INSERT INTO item (sku) VALUES ('B')"), SCHEMA)
            _check(run("SELEKT 1"), FATAL)
            _check(run("SELECT 'abc'::numeric"), FATAL)
    finally:
        engine.dispose()
    # Bare psycopg: the server's SQLSTATE is on the exception itself.
    with psycopg.connect(pg) as c:
        exc = _raised(lambda: c.execute("SELECT nope FROM item"))
        _check(exc, SCHEMA)


def test_postgresql_lock_timeout_and_serialization_failure(pg: str) -> None:
    with psycopg.connect(pg) as holder, psycopg.connect(pg) as waiter:
        holder.execute("SELECT * FROM item WHERE sku = 'A' FOR UPDATE")
        waiter.execute("SET lock_timeout = '100ms'")
        _check(_raised(lambda: waiter.execute("UPDATE item SET qty = 2 WHERE sku = 'A'")), RETRY)
    with psycopg.connect(pg) as a, psycopg.connect(pg, autocommit=True) as b:
        a.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        a.execute("SELECT qty FROM item WHERE sku = 'A'")
        b.execute("UPDATE item SET qty = 3 WHERE sku = 'A'")
        exc = _raised(lambda: a.execute("UPDATE item SET qty = 4 WHERE sku = 'A'"))
        assert isinstance(exc, psycopg.errors.SerializationFailure)
        _check(exc, RETRY)


def test_postgresql_missing_privilege(pg: str) -> None:
    role = f"plain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with psycopg.connect(_pg_dsn(pg, user=role)) as c:
            _check(_raised(lambda: c.execute("SELECT * FROM item")), ACCESS)
        engine = make_engine(pg.replace("postgres@", f"{role}@"), "test")
        try:
            with engine.connect() as conn:
                _check(_raised(lambda: conn.exec_driver_sql("SELECT * FROM item")), ACCESS)
        finally:
            engine.dispose()
    finally:
        with psycopg.connect(pg, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {role}")
            c.execute(f"DROP ROLE {role}")


def _start_replication(dsn: str, slot: str) -> tuple[psycopg.Connection[Any], pq.PGresult]:
    conn = psycopg.connect(dsn, replication="database", autocommit=True)
    res = conn.pgconn.exec_(f"START_REPLICATION SLOT {slot} LOGICAL 0/0".encode())
    return conn, res


def _refusal(res: pq.PGresult, slot: str) -> SyncError:
    code = res.error_field(pq.DiagnosticField.SQLSTATE)
    return replication_start_error(
        slot, code.decode() if code else None, res.error_message.decode(errors="replace")
    )


def test_start_replication_refusals(pg: str) -> None:
    dsn = _pg_dsn(pg)
    conn, res = _start_replication(dsn, "no_such_slot")
    try:
        assert res.status == pq.ExecStatus.FATAL_ERROR
        assert isinstance(_refusal(res, "no_such_slot"), SlotMissingError)
    finally:
        conn.close()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_create_logical_replication_slot('busy', 'test_decoding')")
    first, res = _start_replication(dsn, "busy")
    try:
        assert res.status == pq.ExecStatus.COPY_BOTH
        second, res = _start_replication(dsn, "busy")
        try:
            assert isinstance(_refusal(res, "busy"), DaemonAlreadyRunning)
        finally:
            second.close()
    finally:
        first.close()
    # Without a result's SQLSTATE (libpq failed first), the wording is all there is.
    assert isinstance(
        replication_start_error("s", None, 'replication slot "s" does not exist'),
        SlotMissingError,
    )
    assert isinstance(replication_start_error("s", None, "server closed"), RetryableError)


# --- MariaDB ----------------------------------------------------------------------------------


@pytest.fixture
def maria(mariadb_url: str) -> Iterator[str]:
    name = f"err_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE DATABASE `{name}`")
        cur.execute(f"CREATE TABLE `{name}`.item (sku varchar(10) PRIMARY KEY, qty int NOT NULL)")
        cur.execute(f"INSERT INTO `{name}`.item VALUES ('A', 1)")
        yield f"{mariadb_url.rstrip('/')}/{name}"
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def test_mariadb_connection_failures(maria: str) -> None:
    for url, expect in [
        (f"mysql://root@127.0.0.1:{free_port()}/x", RETRY),  # 2003, refused
        (maria.rsplit("/", 1)[0] + "/nope_db", ACCESS),  # 1049, unknown database
        ("mysql://no_such_user:pw@127.0.0.1:3306/x", ACCESS),  # 1045/1698, access denied
    ]:
        engine = make_engine(url, "test")
        try:
            _check(_raised(engine.connect), expect)
        finally:
            engine.dispose()
    # Bare PyMySQL, as the trigger capture connects.
    refused = _raised(lambda: pymysql.connect(host="127.0.0.1", port=free_port(), user="root"))
    _check(refused, RETRY)
    denied = _raised(
        lambda: pymysql.connect(host="127.0.0.1", port=3306, user="no_such_user", password="pw")
    )
    _check(denied, ACCESS)


def test_mariadb_statement_errors(maria: str) -> None:
    engine = make_engine(maria, "test")
    try:
        with engine.connect() as conn:

            def run(sql: str) -> BaseException:
                exc = _raised(lambda: conn.exec_driver_sql(sql))
                conn.rollback()
                return exc

            _check(run("INSERT INTO item VALUES ('A', 2)"), UNIQUE)
            _check(run("SELECT * FROM no_table"), SCHEMA)
            _check(run("SELEKT 1"), FATAL)
            # PyMySQL files an unknown column (1054) under OperationalError, which SQLAlchemy
            # treats as "the database failed": retryable as well as a schema mismatch.
            exc = run("SELECT nope FROM item")
            assert is_schema_mismatch(exc) and not is_access_refused(exc)
    finally:
        engine.dispose()


def test_mariadb_lock_wait_timeout(maria: str) -> None:
    engine = make_engine(maria, "test")
    try:
        with engine.connect() as holder, engine.connect() as waiter:
            holder.begin()
            holder.exec_driver_sql("SELECT * FROM item WHERE sku = 'A' FOR UPDATE")
            waiter.begin()
            waiter.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            exc = _raised(lambda: waiter.exec_driver_sql("UPDATE item SET qty = 2 WHERE sku = 'A'"))
            assert isinstance(exc, sa.exc.DBAPIError) and exc.orig.args[0] == 1205
            _check(exc, RETRY)
    finally:
        engine.dispose()


# --- SQLite -----------------------------------------------------------------------------------


def test_sqlite_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "s.db"
    _check(_raised(lambda: sqlite3.connect(missing).execute("SELECT 1")), ACCESS)
    engine = make_engine(f"sqlite:///{missing}", "test")
    try:
        _check(_raised(engine.connect), ACCESS)
    finally:
        engine.dispose()

    path = tmp_path / "s.db"
    holder = sqlite3.connect(path, isolation_level=None)
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    try:
        holder.execute("CREATE TABLE item (sku text PRIMARY KEY, qty int)")
        holder.execute("INSERT INTO item VALUES ('A', 1)")
        _check(_raised(lambda: holder.execute("INSERT INTO item VALUES ('A', 2)")), UNIQUE)
        # sqlite3 files even a syntax error under OperationalError, and every sqlite3
        # OperationalError counts as retryable (the staging store is ours; a locked or briefly
        # unreadable file is what it usually means). Narrowing that by result code would change how
        # capture reacts to a broken staging file, so it is written down here instead.
        _check(_raised(lambda: holder.execute("SELEKT 1")), RETRY)
        holder.execute("BEGIN IMMEDIATE")
        _check(_raised(lambda: waiter.execute("BEGIN IMMEDIATE")), RETRY)  # database is locked
    finally:
        holder.close()
        waiter.close()


# --- HTTP -------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = int(self.path.strip("/").split("?")[0] or 200)
        body = b'{"message": "x"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_errors(http_url: str) -> None:
    refused = _raised(lambda: httpx.get(f"http://127.0.0.1:{free_port()}/", timeout=3))
    assert isinstance(refused, httpx.ConnectError)
    _check(refused, RETRY)
    shop = ShopHttp("shop", http_url, timeout=3)
    gone = ShopHttp("shop", f"http://127.0.0.1:{free_port()}", timeout=3)
    try:
        for status, cls in [(500, ShopUnavailable), (429, ShopUnavailable), (401, ShopError)]:
            exc = _raised(lambda status=status: shop.request("GET", f"/{status}"))
            assert type(exc) is cls
            assert classify(exc) is cls
        exc = _raised(lambda: gone.request("GET", "/"))
        assert isinstance(exc, ShopUnavailable)
        _check(exc, Expect(ShopUnavailable, retryable=True))
    finally:
        shop.close()
        gone.close()
