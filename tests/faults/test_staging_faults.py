"""Faults of the staging store: the staging PostgreSQL unavailable (its own cluster stopped, then
started) and the staging SQLite file's disk full (a small tmpfs, then grown) — while writers keep
changing the ERP. The slot keeps the changes on the ERP side, so after recovery staging must equal
the source. The daemon should ride the outage out; if it exits instead, the test restarts it (as
systemd's ``Restart=on-failure`` would) to prove nothing was lost, and records how it exited.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.localpg import LocalCluster
from tests import test_orders_support as support
from tests.faults.common import (
    RSS_LIMIT_MB,
    TABLES,
    RssSampler,
    Writer,
    check_staging_equals_source,
    erp_connect,
    ledger_states,
    orders_config,
    seed_erp,
)
from tests.faults.conftest import Row
from tests.faults.test_order_intake_kill9 import FolderIntake, burst, erp_e_numbers
from tests.helpers import DaemonProcess, assert_staging_equals_source, base_config, wait_until

FULL = pytest.mark.faults_full
_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url


def _survived(d: DaemonProcess, row: Row, cfg: Path, tmp_path: Path) -> tuple[DaemonProcess, bool]:
    """(the daemon to check with, whether the original process rode the fault out)."""
    if d.alive():
        return d, True
    code = d.proc.returncode if d.proc else None
    last = [ln for ln in d.output().splitlines() if '"level": "error"' in ln or "Error" in ln]
    row.notes.append(
        f"the daemon exited with code {code} during the fault; last error: "
        f"{(last[-1] if last else '?')[:300]}"
    )
    return DaemonProcess(cfg, log=tmp_path / "restarted.log").start(), False


class DaemonDidNotSurvive(Exception):
    """Data was intact, but the daemon process died of the fault (a known product bug)."""


STAGING_BUG = (
    "product bug: a staging error inside LogicalSource.run_cycle (replicator/cdc/logical.py "
    "_commit_batch -> staging.py ApplyTxn.commit/flush) is not mapped to RetryableError: "
    "sqlalchemy.exc.OperationalError / sqlite3.OperationalError escape Daemon.run (which only "
    "catches FatalError), the process dies with a traceback and exit code 1; ApplyTxn.rollback "
    "on the lost connection raises again. No data is lost (the slot keeps the changes; a restart "
    "catches up), but the daemon should ride the outage out with backoff"
)


@pytest.mark.fault("staging-pg-down")
@pytest.mark.parametrize("outage", [5, pytest.param(30, marks=FULL)])
def test_staging_postgresql_unavailable(
    erp_db: str, own_cluster: LocalCluster, tmp_path: Path, fault_row: Row, seed: int, outage: int
) -> None:
    seed_erp(erp_db)
    staging = own_cluster.createdb("staging").replace("postgresql://", "postgresql://", 1)
    cfg = base_config(tmp_path, erp_db, staging, TABLES)
    fault_row.injected = (
        f"staging PostgreSQL (own cluster) stopped (fast) for {outage} s, then started"
    )
    fault_row.how_often = "1x mid-stream, writers running"
    fault_row.checked = (
        "staging == source after recovery; the daemon process survives the outage; RSS"
    )
    d = DaemonProcess(cfg).start()
    try:
        with RssSampler(lambda: d.pid if d.alive() else None) as sampler:
            assert_staging_equals_source(erp_db, staging, TABLES, timeout=60)
            with Writer(erp_db, seed) as writer:
                time.sleep(1)
                own_cluster.stop("fast")
                time.sleep(outage)
                own_cluster.start()
                time.sleep(2)
            d, survived = _survived(d, fault_row, cfg, tmp_path)
            comp = check_staging_equals_source(erp_db, staging, TABLES, timeout=90)
        fault_row.peak_rss_mb = sampler.peak_mb
        fault_row.measured = (
            f"{writer.commits} writer txns; {comp.summary()}; daemon "
            f"{'survived' if survived else 'EXITED and was restarted'}"
        )
        assert sampler.peak_mb < RSS_LIMIT_MB
        if not survived:
            raise DaemonDidNotSurvive(fault_row.notes)
        assert d.terminate() == 0
    finally:
        d.kill9()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (root only); skipped with the reason when it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {res.stderr.strip()} (needs root)")
    try:
        yield mnt
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.fault("staging-sqlite-full")
def test_staging_sqlite_disk_full(
    erp_db: str, small_fs: Path, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    seed_erp(erp_db)
    staging = f"sqlite:///{small_fs / 'staging.db'}"
    cfg = base_config(tmp_path, erp_db, staging, TABLES)
    fault_row.injected = (
        "staging SQLite on a 4 MB tmpfs; ~8 MB of ERP changes fill it; after "
        "6 s the tmpfs is grown to 64 MB (`mount -o remount,size=64m`)"
    )
    fault_row.how_often = "1x mid-stream"
    fault_row.checked = (
        "staging == source after space is freed; SQLite `PRAGMA integrity_check` "
        "ok; the daemon process survives ENOSPC; RSS"
    )
    d = DaemonProcess(cfg).start()
    try:
        with RssSampler(lambda: d.pid if d.alive() else None) as sampler:
            assert_staging_equals_source(erp_db, staging, TABLES, timeout=60)
            with erp_connect(erp_db) as c:
                for k in range(4):
                    c.execute(
                        "INSERT INTO items (id, sku, qty, note) SELECT g, 'FILL-' || g, 1, "
                        "repeat(md5(g::text), 64) FROM generate_series(%s, %s) g",
                        (100_000 + k * 1000, 100_999 + k * 1000),
                    )
            with Writer(erp_db, seed, threads=2) as writer:
                time.sleep(6)
                df = subprocess.run(["df", "-k", str(small_fs)], capture_output=True, text=True)
                subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
                time.sleep(2)
            d, survived = _survived(d, fault_row, cfg, tmp_path)
            comp = check_staging_equals_source(erp_db, staging, TABLES, timeout=90)
        full_pct = df.stdout.split()[-2] if df.stdout else "?"
        with sqlite3.connect(str(small_fs / "staging.db")) as db:
            (integrity,) = db.execute("PRAGMA integrity_check").fetchone()
        fault_row.peak_rss_mb = sampler.peak_mb
        fault_row.measured = (
            f"tmpfs {full_pct} used at the peak; {writer.commits} writer txns; "
            f"{comp.summary()}; integrity_check {integrity}; daemon "
            f"{'survived' if survived else 'EXITED and was restarted'}"
        )
        assert integrity == "ok"
        assert sampler.peak_mb < RSS_LIMIT_MB
        if not survived:
            raise DaemonDidNotSurvive(fault_row.notes)
        assert d.terminate() == 0
    finally:
        d.kill9()


@pytest.mark.fault("staging-down-at-start")
def test_staging_unreachable_at_start_up(
    pg_erp_url: str, own_cluster: LocalCluster, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    """The daemon starts while its staging PostgreSQL is down and order files wait in the inbox
    folder: nothing may be taken from the folder before the staging store holds it. Once the
    staging store is up, every dropped order is in the ERP exactly once."""
    staging = own_cluster.createdb("staging")
    own_cluster.stop("fast")
    intake = FolderIntake(tmp_path)
    cfg = orders_config(tmp_path, pg_erp_url, [intake.shop()], staging_url=staging)
    intake.deliver(burst(30, seed, first=700_000))
    fault_row.injected = (
        "staging PostgreSQL (own cluster) stopped before `sync-daemon run` starts; 30 order "
        "files waiting in the inbox folder; staging started after 8 s"
    )
    fault_row.how_often = "1 start-up"
    fault_row.checked = (
        "no file leaves the inbox while staging is down; after staging is up: files dropped "
        "= orders in the ERP, each exactly once; how the daemon rode it out"
    )
    d = DaemonProcess(cfg).start()
    try:
        with RssSampler(lambda: d.pid if d.alive() else None) as sampler:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                assert intake.acknowledged() == set(), "a file left the inbox, staging is down"
                time.sleep(0.2)
            own_cluster.start()
            d, survived = _survived(d, fault_row, cfg, tmp_path)
            wait_until(
                lambda: (
                    intake.settled()
                    and all(
                        st == "delivered"
                        for (_, e), st in ledger_states(staging).items()
                        if e in intake.delivered()
                    )
                    and len(ledger_states(staging)) == 30
                ),
                120,
                0.5,
                "every dropped order delivered",
            )
            in_erp = erp_e_numbers(pg_erp_url)
            assert set(in_erp) == intake.delivered(), set(in_erp) ^ intake.delivered()
            assert all(n == 1 for n in in_erp.values()), in_erp
        fault_row.peak_rss_mb = sampler.peak_mb
        assert survived, fault_row.notes
        out = d.output()
        assert '"staging_unavailable"' in out and "Traceback" not in out, out[-2000:]
        fault_row.measured = (
            f"0 files taken while staging was down; dropped {len(intake.delivered())} = in the "
            f"ERP {len(in_erp)}, 0 doubled; daemon "
            + "waited for staging (`staging_unavailable` warnings with backoff, no traceback)"
        )
        assert d.terminate() == 0
    finally:
        d.kill9()
