"""Operator mistakes: the replication slot dropped by a DBA, and a second daemon started on the
same source. The daemon must stop that source with a clear error (exit code 3) and never
recreate the slot silently; ``sync-daemon resync`` recovers on purpose. Of two daemons only one
may capture; the other says why and the first keeps capturing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.common import (
    TABLES,
    RssSampler,
    Writer,
    check_staging_equals_source,
    erp_connect,
    seed_erp,
)
from tests.faults.conftest import Row
from tests.helpers import ROOT, DaemonProcess, assert_staging_equals_source, base_config, wait_until


@pytest.mark.fault("slot-dropped")
def test_slot_dropped_by_dba_then_resync(
    erp_db: str, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    seed_erp(erp_db)
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    cfg = base_config(tmp_path, erp_db, staging, TABLES)
    fault_row.injected = (
        "`pg_drop_replication_slot` by a DBA (walsender terminated) while the "
        "daemon streams; writers keep going; then `sync-daemon resync --yes`"
    )
    fault_row.how_often = "1 drop"
    fault_row.checked = (
        "exit code 3 with 'is gone' + 'resync' in the log; slot NOT recreated; "
        "after resync + restart staging == source"
    )
    with DaemonProcess(cfg) as d:
        assert_staging_equals_source(erp_db, staging, TABLES, timeout=60)
        writer = Writer(erp_db, seed, threads=2).__enter__()
        with erp_connect(erp_db) as c:
            c.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = 'sync_daemon' AND active_pid IS NOT NULL"
            )
            wait_until(
                lambda: (
                    c.execute(
                        "SELECT active_pid FROM pg_replication_slots WHERE "
                        "slot_name = 'sync_daemon'"
                    ).fetchone()
                    in (None, (None,))
                ),
                10,
                0.02,
                "slot released",
            )
            c.execute("SELECT pg_drop_replication_slot('sync_daemon')")
        code = d.wait(60)
        out = d.output()
        time.sleep(1)
        writer.finish()
    assert code == 3, out[-2000:]
    assert "is gone" in out and "resync" in out
    with erp_connect(erp_db) as c:
        slots = c.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'sync_daemon'"
        ).fetchone()
    assert slots == (0,), "the daemon recreated the slot silently"
    res = subprocess.run(
        [sys.executable, str(ROOT / "sync_daemon.py"), "resync", "--config", str(cfg), "--yes"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    with DaemonProcess(cfg, log=tmp_path / "after.log") as d2:
        with erp_connect(erp_db) as c:
            c.execute("DELETE FROM stock WHERE warehouse = 2")
        comp = check_staging_equals_source(erp_db, staging, TABLES)
        assert d2.terminate() == 0
    fault_row.measured = (
        f"exit 3, slot count 0 until resync; {writer.commits} writer txns; {comp.summary()}"
    )


@pytest.mark.fault("two-daemons")
def test_second_daemon_on_the_same_source(
    erp_db: str, tmp_path: Path, fault_row: Row, seed: int
) -> None:
    seed_erp(erp_db)
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    cfg = base_config(tmp_path, erp_db, staging, TABLES)
    other = tmp_path / "other"
    other.mkdir()
    cfg_other = base_config(other, erp_db, f"sqlite:///{other / 'staging.db'}", TABLES)
    fault_row.injected = (
        "a 2nd `sync-daemon run` with the same config (same staging), and a 3rd "
        "with its own staging, both on the same ERP slot, while the 1st streams"
    )
    fault_row.how_often = "2 intruders"
    fault_row.checked = (
        "intruders exit 3 naming the slot and the holder; the 1st keeps capturing; "
        "staging == source"
    )
    with DaemonProcess(cfg) as d, RssSampler(lambda: d.pid if d.alive() else None) as sampler:
        assert_staging_equals_source(erp_db, staging, TABLES, timeout=60)
        with Writer(erp_db, seed, threads=2) as writer:
            msgs = []
            for c, log in ((cfg, tmp_path / "second.log"), (cfg_other, other / "third.log")):
                with DaemonProcess(c, log=log) as d2:
                    assert d2.wait(30) == 3, d2.output()[-2000:]
                    assert "already captures slot 'sync_daemon'" in d2.output()
                    msgs.append(d2.output())
            assert d.alive()
        comp = check_staging_equals_source(erp_db, staging, TABLES)
        assert d.terminate() == 0
    fault_row.peak_rss_mb = sampler.peak_mb
    fault_row.measured = f"both intruders exit 3; {writer.commits} writer txns; {comp.summary()}"
