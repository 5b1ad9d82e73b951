"""Shared fixtures: a throwaway PostgreSQL cluster with wal_level=logical, fresh databases per test,
staging URLs for SQLite and PostgreSQL, and the local MariaDB server.

Environment:
  SYNC_TEST_PG_DSN    use an existing server (needs wal_level=logical) instead of a throwaway one
  SYNC_TEST_MARIADB   MariaDB URL (default mysql://root@127.0.0.1:3306)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, settings

from replicator.localpg import LocalCluster, find_bindir

# The property tests check outcomes, not speed: on a loaded 2-core CI machine generating data or
# running an example may take longer than hypothesis's defaults allow (a 200 ms deadline, the
# "too slow" health check), which made them fail for timing alone. A test's own @settings still
# apply on top of this profile.
settings.register_profile(
    "sync-daemon", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("sync-daemon")

ROOT = Path(__file__).resolve().parent.parent

# The Tryton tests share one database template that takes a minute of CPU to build when the server
# does not have it yet (a fresh machine). Built in the background from the start of the session,
# at the lowest priority, it is ready by the time those tests run instead of holding up the first
# of them; the build takes the same lock as the tests' own `ensure_template`, which waits for it.
_tryton_build: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _tryton_build
    if os.environ.get("PYTEST_XDIST_WORKER") not in (None, "gw0"):
        return
    if not any("tryton" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    try:
        from tests.erp import tryton_db

        if tryton_db.database_exists(tryton_db.TEMPLATE):
            return
    except Exception:  # no trytond, no server: the fixture skips or says why itself
        return
    _tryton_build = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, "-m", "tests.erp.tryton_db"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A build that outlives the session (its tests deselected or failed early) is stopped; a
    # half-built template is never renamed into place, the next build starts it again.
    if _tryton_build is not None and _tryton_build.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_tryton_build.pid, signal.SIGTERM)
        _tryton_build.wait(30)


class PgServer:
    """A PostgreSQL server for tests: hands out fresh databases."""

    def __init__(self, admin_dsn: str, cluster: LocalCluster | None) -> None:
        self.admin_dsn = admin_dsn
        self.cluster = cluster

    def dsn(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=dbname)

    def url(self, dbname: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.admin_dsn)
        user = info.get("user", "postgres")
        return (
            f"postgresql://{user}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{dbname}"
        )

    def createdb(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def dropdb(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for (slot,) in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall():
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND active_pid IS NOT NULL",
                    (slot,),
                )
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    env = os.environ.get("SYNC_TEST_PG_DSN")
    if env:
        yield PgServer(env, None)
        return
    if find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries and no SYNC_TEST_PG_DSN")
    cluster = LocalCluster().init()
    try:
        cluster.start()
        yield PgServer(cluster.dsn(), cluster)
    finally:
        cluster.destroy()


@pytest.fixture
def erp_db(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty ERP database on the logical-replication server; yields its URL."""
    name = pg_server.createdb("erp")
    try:
        yield pg_server.url(name)
    finally:
        pg_server.dropdb(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def staging_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_server: PgServer
) -> Iterator[str]:
    """A staging store URL: the same test body runs against SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'staging.db'}"
        return
    name = pg_server.createdb("staging")
    try:
        yield pg_server.url(name)
    finally:
        pg_server.dropdb(name)


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    """The local MariaDB server (skips when it is not running)."""
    url = os.environ.get("SYNC_TEST_MARIADB", "mysql://root@127.0.0.1:3306")
    try:
        import pymysql

        pymysql.connect(
            host="127.0.0.1", port=3306, user="root", password="", connect_timeout=3
        ).close()
    except Exception as exc:  # pragma: no cover - environment dependent
        if os.environ.get("CI"):
            raise
        pytest.skip(f"MariaDB not reachable: {exc}")
    return url
