"""The checks the README tells people to run, with things wrong: one line naming what is wrong
and where, its own exit code, never a traceback; and ``check-config --connect`` finds what a
first ``run`` would trip over (wal_level, REPLICATION, publication and slot rights, SELECT
rights, shops' reachability and credentials)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from replicator.localpg import LocalCluster, find_bindir
from tests.emulators.woocommerce import WooCommerceEmulator
from tests.helpers import ROOT, base_config, write_config

TABLES = ["public.stock"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "sync_daemon.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(res: subprocess.CompletedProcess[str], *names: str) -> str:
    """The command failed with a short message that names every one of ``names``."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode != 0, out
    for n in names:
        assert n in out, (n, out)
    return out


@pytest.fixture
def erp(erp_db: str) -> str:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int)")
    return erp_db


@pytest.fixture(scope="module")
def replica_cluster() -> Iterator[LocalCluster]:
    """A server with wal_level=replica, where role ``pwuser`` must give a password."""
    if find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries")
    cluster = LocalCluster(settings={"wal_level": "replica"}).init()
    hba = cluster.datadir / "pg_hba.conf"
    hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as c:
            c.execute("CREATE ROLE pwuser LOGIN PASSWORD 'right'")
            c.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int)")
        yield cluster
    finally:
        cluster.destroy()


def test_check_config_connect_wrong_port_database_password(
    erp: str, replica_cluster: LocalCluster, tmp_path: Path
) -> None:
    port = erp.rsplit(":", 1)[1].split("/")[0]
    wrong_port = base_config(
        tmp_path, erp.replace(f":{port}/", ":1/"), f"sqlite:///{tmp_path / 'x.db'}", TABLES
    )
    out = _one_line_error(_cli("check-config", "--connect", "--config", str(wrong_port)), ":1/")
    assert "FAIL  erp postgresql://postgres@127.0.0.1:1/" in out and "refused" in out

    wrong_db = base_config(
        tmp_path, erp.rsplit("/", 1)[0] + "/nope", f"sqlite:///{tmp_path / 'x.db'}", TABLES
    )
    res = _cli("check-config", "--connect", "--config", str(wrong_db))
    _one_line_error(res, 'database "nope" does not exist')
    assert res.returncode == 4

    bad_pw = f"postgresql://pwuser:wrong@127.0.0.1:{replica_cluster.port}/postgres"
    cfg = base_config(tmp_path, bad_pw, f"sqlite:///{tmp_path / 'x.db'}", TABLES)
    res = _cli("check-config", "--connect", "--config", str(cfg))
    out = _one_line_error(res, "password authentication failed", "pwuser")
    assert res.returncode == 4 and "wrong" not in out


def test_check_config_connect_rejects_wal_level_replica(
    replica_cluster: LocalCluster, tmp_path: Path
) -> None:
    cfg = base_config(tmp_path, replica_cluster.dsn(), f"sqlite:///{tmp_path / 's.db'}", TABLES)
    res = _cli("check-config", "--connect", "--config", str(cfg))
    _one_line_error(res, "FAIL  erp wal_level: is 'replica'", "ALTER SYSTEM SET wal_level")
    assert res.returncode == 3


def test_check_config_connect_checks_role_rights_and_slot(erp: str, tmp_path: Path) -> None:
    """A role without REPLICATION, that may not create the publication nor read the table."""
    plain = f"plain_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: a name of its own
    with psycopg.connect(erp, autocommit=True) as c:
        c.execute(f"CREATE ROLE {plain} LOGIN")
    try:
        url = erp.replace("postgres@", f"{plain}@")
        cfg = base_config(tmp_path, url, f"sqlite:///{tmp_path / 's.db'}", TABLES)
        res = _cli("check-config", "--connect", "--config", str(cfg))
        out = _one_line_error(
            res,
            f"FAIL  erp role: {plain} lacks the REPLICATION attribute: ALTER ROLE {plain} REPLICATION",
            "FAIL  erp publication sync_daemon: missing, and this role may not create it",
            "CREATE PUBLICATION sync_daemon FOR TABLE public.stock",
            f"FAIL  table public.stock: no SELECT right: GRANT SELECT ON public.stock TO {plain}",
            "ok    erp slot sync_daemon: missing; the daemon creates it at start",
        )
        assert res.returncode == 4, out
        # The superuser passes every check; nothing was created by checking.
        ok = base_config(tmp_path, erp, f"sqlite:///{tmp_path / 's.db'}", TABLES)
        res = _cli("check-config", "--connect", "--config", str(ok))
        assert res.returncode == 0, res.stdout + res.stderr
        assert "FAIL" not in res.stdout
        with psycopg.connect(erp) as c:
            assert c.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
            assert c.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
    finally:
        with psycopg.connect(erp, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {plain}")
            c.execute(f"DROP ROLE {plain}")


def test_check_config_connect_checks_shops(erp: str, tmp_path: Path) -> None:
    with WooCommerceEmulator(consumer_key="ck_right", consumer_secret="cs_right") as woo:
        sections = {
            "erp": {"dsn": erp},
            "capture": {"mode": "logical", "tables": TABLES},
            "staging": {"url": f"sqlite:///{tmp_path / 's.db'}"},
            "daemon": {"state_dir": str(tmp_path / "state")},
        }
        text = write_config(tmp_path / "c.toml", sections).read_text()
        shops = (
            f'[[shops]]\nname = "good"\nkind = "woocommerce"\nurl = "{woo.url}"\n'
            'consumer_key = "ck_right"\nconsumer_secret = "cs_right"\n'
            f'[[shops]]\nname = "badkey"\nkind = "woocommerce"\nurl = "{woo.url}"\n'
            'consumer_key = "ck_wrong"\nconsumer_secret = "cs_wrong"\n'
            '[[shops]]\nname = "gone"\nkind = "woocommerce"\nurl = "http://127.0.0.1:1/"\n'
            'consumer_key = "ck_right"\nconsumer_secret = "cs_right"\n'
            f'[[shops]]\nname = "drop"\nkind = "inbox"\ninbox_dir = "{tmp_path / "nodir"}"\n'
        )
        cfg = tmp_path / "c.toml"
        cfg.write_text(text + shops)
        res = _cli("check-config", "--connect", "--config", str(cfg))
    out = _one_line_error(
        res,
        "ok    shop good: ",
        "FAIL  shop badkey: ",
        "FAIL  shop gone: http://127.0.0.1:1: ",
        f"FAIL  shop drop: inbox_dir {tmp_path / 'nodir'} does not exist",
    )
    assert "cs_wrong" not in out and "ck_wrong" not in out
    assert res.returncode == 4


def test_staging_path_that_cannot_be_opened_is_named(erp: str, tmp_path: Path) -> None:
    where = tmp_path / "no" / "such" / "dir" / "s.db"
    cfg = base_config(tmp_path, erp, f"sqlite:///{where}", TABLES)
    res = _cli("check-config", "--connect", "--config", str(cfg))
    _one_line_error(res, f"FAIL  staging: staging store {where}: cannot open it")
    assert res.returncode == 4
    res = _cli("run", "--config", str(cfg))
    out = _one_line_error(res, f"staging store {where}: cannot open it")
    assert res.returncode == 4, out
    res = _cli("status", "--config", str(cfg))
    _one_line_error(res, f"staging store {where}")


def test_lag_with_the_erp_down_is_one_line(erp: str, tmp_path: Path) -> None:
    port = erp.rsplit(":", 1)[1].split("/")[0]
    cfg = base_config(
        tmp_path, erp.replace(f":{port}/", ":1/"), f"sqlite:///{tmp_path / 's.db'}", TABLES
    )
    res = _cli("lag", "--config", str(cfg))
    _one_line_error(res, "cannot reach the ERP (postgresql://postgres@127.0.0.1:1/")
    assert res.returncode == 1


def test_logs_into_a_closed_pipe_is_quiet(erp: str, tmp_path: Path) -> None:
    """``sync-daemon logs | head -1`` with many records: no BrokenPipeError."""
    from replicator.logstore import LogStore
    from replicator.staging import StagingStore

    staging = f"sqlite:///{tmp_path / 's.db'}"
    store = StagingStore(staging)
    store.setup()
    logs = LogStore(store.engine, 7)
    logs.start()
    for i in range(3000):
        logs.sink(
            {"event": "filler", "level": "info", "service": "orders", "i": i, "pad": "x" * 80}
        )
    assert logs.flush(30)
    logs.stop()
    store.dispose()
    cfg = base_config(tmp_path, erp, staging, TABLES)
    proc = subprocess.Popen(
        f"{sys.executable} {ROOT / 'sync_daemon.py'} logs --limit 3000 --config {cfg} | head -1",
        shell=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert "filler" in out
    assert "BrokenPipe" not in err and "Traceback" not in err, err


def test_lag_shows_sizes_for_people(erp: str, tmp_path: Path) -> None:
    import re

    with psycopg.connect(erp, autocommit=True) as c:
        c.execute("SELECT pg_create_logical_replication_slot('lag_probe', 'pgoutput')")
    try:
        cfg = base_config(tmp_path, erp, f"sqlite:///{tmp_path / 's.db'}", TABLES)
        res = _cli("lag", "--config", str(cfg))
        out = res.stdout
        assert "slot lag_probe: INACTIVE" in out, out + res.stderr
        assert re.search(r"safe_wal_size \d+\.\d GB", out), out
        assert re.search(r"retained WAL (\d+ B|\d+\.\d [kMG]B)", out), out
    finally:
        with psycopg.connect(erp, autocommit=True) as c:
            c.execute("SELECT pg_drop_replication_slot('lag_probe')")
