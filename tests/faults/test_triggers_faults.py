"""Trigger capture mode under faults, through the real daemon process (``sync-daemon triggers
install``, then ``sync-daemon run`` with ``capture.mode = "triggers"``), on a PostgreSQL and on a
MariaDB ERP: kill -9 of the daemon at seeded random moments while 3 writers keep changing the ERP
(inserts, updates, deletes, key changes; conflicts rolled back), and — PostgreSQL — the ERP server
stopped and started again. After the last restart staging must equal the source row by row.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.localpg import LocalCluster
from tests.capture_worker import Erp, new_mysql_db
from tests.faults.common import (
    RSS_LIMIT_MB,
    RssSampler,
    daemon_errors,
    install_triggers,
    logged,
    wait_alive,
)
from tests.faults.conftest import Row
from tests.helpers import DaemonProcess, base_config, wait_until
from tests.test_capture_contract import DDL, TABLE, Writers, source_rows, staging_rows

FULL = pytest.mark.faults_full


@pytest.fixture
def trigger_erp(request: pytest.FixtureRequest, erp_kind: str) -> Iterator[Erp]:
    if erp_kind == "postgresql":
        pg = request.getfixturevalue("pg_server")
        name = pg.createdb("erp")
        yield Erp("postgresql", pg.url(name))
        pg.dropdb(name)
        return
    erp = new_mysql_db(request.getfixturevalue("mariadb_url"))
    try:
        yield erp
    finally:
        erp.drop()


def _prepare(erp: Erp, tmp_path: Path, rows: int = 200) -> tuple[Path, str]:
    erp.execute(DDL)
    values = ", ".join(f"({i}, 'item {i}', {i * 3}, {i}.25)" for i in range(1, rows + 1))
    erp.execute(f"INSERT INTO items (id, name, qty, price) VALUES {values}")
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    cfg = base_config(tmp_path, erp.url, staging, [TABLE], mode="triggers", poll_interval=0.05)
    install_triggers(cfg)
    return cfg, staging


def _equal(erp: Erp, staging: str, timeout: float = 120) -> int:
    """Wait until staging equals the source row by row; the row count."""
    last: list[int] = []

    def same() -> bool:
        src, st = source_rows(erp), staging_rows(staging)
        last[:] = [len(src), len(st)]
        return src == st

    try:
        wait_until(same, timeout, 0.3, "staging == source")
    except AssertionError:
        raise AssertionError(
            f"staging differs from the source (rows source, staging): {last}"
        ) from None
    return last[0]


@pytest.mark.fault("triggers-kill9")
@pytest.mark.parametrize(
    ("erp_kind", "kills"),
    [
        ("postgresql", 5),
        ("mariadb", 5),
        pytest.param("postgresql", 20, marks=FULL),
        pytest.param("mariadb", 20, marks=FULL),
    ],
)
def test_kill9_in_trigger_capture_mode(
    trigger_erp: Erp, erp_kind: str, kills: int, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    erp = trigger_erp
    cfg, staging = _prepare(erp, tmp_path)
    rnd = random.Random(f"{seed}-{erp_kind}-{kills}")
    current: list[DaemonProcess] = []
    fault_row.injected = (
        f"SIGKILL of `sync-daemon run` in trigger capture mode ({erp_kind} changelog) at seeded "
        "random moments; 3 writer threads (inserts, updates, deletes, key changes)"
    )
    fault_row.checked = "staging == source after the last restart (every row); RSS; no traceback"
    with RssSampler(lambda: current[0].pid if current and current[0].alive() else None) as rss:
        with Writers(erp, 3, seed=seed, pause=0.002) as w:
            try:
                for i in range(kills):
                    d = DaemonProcess(cfg, log=tmp_path / f"daemon-{i:02d}.log").start()
                    current[:] = [d]
                    wait_alive(d, logged(d, "capture_started"), 60, "capture started", 0.02)
                    time.sleep(rnd.uniform(0.05, 1.5))
                    d.kill9()
            finally:
                for p in current:
                    p.kill9()
        d = DaemonProcess(cfg, log=tmp_path / "final.log").start()
        current[:] = [d]
        try:
            rows = _equal(erp, staging)
            assert not daemon_errors(d.output()), d.output()[-3000:]
            assert d.terminate() == 0
        finally:
            d.kill9()
    fault_row.how_often = f"{kills} kills while writing"
    fault_row.peak_rss_mb = rss.peak_mb
    fault_row.measured = f"{w.commits} writer txns; items {rows} rows equal in staging"
    assert w.commits > kills
    assert rss.peak_mb < RSS_LIMIT_MB


@pytest.mark.fault("triggers-erp-restart")
@pytest.mark.parametrize("erp_kind", ["postgresql"])
def test_erp_restarted_in_trigger_capture_mode(
    own_cluster: LocalCluster, erp_kind: str, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    erp = Erp("postgresql", own_cluster.createdb("erp"))
    cfg, staging = _prepare(erp, tmp_path)
    fault_row.injected = (
        "`pg_ctl stop -m immediate` of the ERP cluster for 2 s in trigger capture mode, then "
        "start; writers keep going (their failed transactions are retried by nobody)"
    )
    fault_row.how_often = "2x mid-stream"
    fault_row.checked = "staging == source; the daemon reconnects by itself; no traceback"
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as rss:
        wait_alive(d, logged(d, "capture_started"), 60, "capture started")
        with Writers(erp, 3, seed=seed, pause=0.002) as w:
            for _ in range(2):
                time.sleep(1.0)
                own_cluster.stop("immediate")
                time.sleep(2)
                own_cluster.start()
            time.sleep(1.0)
        rows = _equal(erp, staging)
        assert d.alive(), d.output()[-3000:]
        assert not daemon_errors(d.output()), d.output()[-3000:]
        assert d.terminate() == 0
    fault_row.peak_rss_mb = rss.peak_mb
    fault_row.measured = f"{w.commits} writer txns; items {rows} rows equal in staging"
    assert rss.peak_mb < RSS_LIMIT_MB
