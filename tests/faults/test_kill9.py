"""kill -9 of the daemon at seeded random points across one run: during the initial snapshot,
during start-up, while streaming, and while a large source transaction is being applied — with
writers changing the ERP the whole time. After the last restart staging must equal the source.

Each kill is classified from the log of the incarnation it killed (``slot_created`` without
``snapshot_done``: inside the snapshot copy; before ``streaming_started``: start-up; after it:
streaming). A kill aimed at a batch apply is *verified* when the staging checkpoint right after the
kill lies before the commit LSN of the large transaction, i.e. the daemon died before that batch
was committed to staging.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from replicator.cdc.pgoutput import lsn_to_int
from replicator.staging import StagingStore
from tests.faults.common import (
    RSS_LIMIT_MB,
    TABLES,
    RssSampler,
    Writer,
    check_staging_equals_source,
    erp_connect,
    logged,
    seed_erp,
)
from tests.faults.conftest import Row
from tests.helpers import DaemonProcess, base_config, wait_until

FULL = pytest.mark.faults_full
BULK = 60_000


def _checkpoint(staging: str) -> int | None:
    store = StagingStore(staging)
    try:
        store.setup()
        cp = store.load_checkpoint("erp")
    finally:
        store.dispose()
    return None if cp is None or cp.state != "streaming" else lsn_to_int(cp.position)


def _phase(log: str) -> str:
    if "slot_created" in log and "snapshot_done" not in log:
        return "snapshot"
    if "streaming_started" not in log:
        return "start-up"
    return "streaming"


@pytest.mark.fault("kill9-random")
@pytest.mark.parametrize(
    ("points", "staging_kind"),
    [
        (20, "sqlite"),
        pytest.param(40, "sqlite", marks=FULL),
        pytest.param(30, "postgresql", marks=FULL),
    ],
)
def test_kill9_at_seeded_random_points(
    erp_db: str,
    tmp_path: Path,
    fault_row: Row,
    seed: int,
    points: int,
    staging_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    erp = erp_db
    if staging_kind == "sqlite":
        staging = f"sqlite:///{tmp_path / 'staging.db'}"
    else:
        pg = request.getfixturevalue("pg_server")
        name = pg.createdb("staging")
        request.addfinalizer(lambda: pg.dropdb(name))
        staging = pg.url(name)
    seed_erp(erp, bulk=BULK)
    cfg = base_config(tmp_path, erp, staging, TABLES, batch_size=2000)
    rnd = random.Random(seed)
    fault_row.injected = (
        f"SIGKILL of `sync-daemon run` at seeded random moments (seed {seed}); "
        f"a {BULK}-row snapshot; 3 writer threads + {BULK}-row UPDATE transactions"
    )
    fault_row.checked = (
        "staging == source after the last restart (rows, SHA-256 per table); "
        "RSS of every incarnation"
    )
    phases: Counter[str] = Counter()
    apply_aimed = apply_verified = 0
    current: list[DaemonProcess] = []

    def start(i: int) -> DaemonProcess:
        d = DaemonProcess(cfg, log=tmp_path / f"daemon-{i:02d}.log").start()
        current[:] = [d]
        return d

    with RssSampler(lambda: current[0].pid if current and current[0].alive() else None) as sampler:
        writer = Writer(erp, seed)
        try:
            for i in range(points):
                d = start(i)
                if i < 3:  # the first kills aim at the initial copy (it restarts each time)
                    wait_until(
                        logged(d, "slot_created", "streaming_started"),
                        60,
                        0.01,
                        "snapshot began",
                    )
                    time.sleep(rnd.uniform(0.02, 0.3))
                else:
                    if i == 3:
                        writer.__enter__()
                    kind = rnd.choices(["start-up", "streaming", "apply"], [1, 3, 2])[0]
                    if kind == "start-up":
                        time.sleep(rnd.uniform(0.2, 1.0))
                    else:
                        wait_until(logged(d, "streaming_started"), 90, 0.05, "streaming")
                        if kind == "apply":
                            with erp_connect(erp) as c:
                                c.execute("UPDATE stock SET qty = qty + 1 WHERE warehouse = 9")
                                (lsn,) = c.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
                            time.sleep(rnd.uniform(0.05, 0.5))
                        else:
                            time.sleep(rnd.uniform(0.1, 1.2))
                phase = _phase(d.output())
                d.kill9()
                if phase == "streaming" and i >= 3 and kind == "apply":
                    apply_aimed += 1
                    cp = _checkpoint(staging)
                    if cp is not None and cp < lsn_to_int(lsn):
                        apply_verified += 1
                        phase = "batch apply"
                phases[phase] += 1
        finally:
            writer.finish()
            for p in current:
                p.kill9()
        d = start(points)
        try:
            comp = check_staging_equals_source(erp, staging, TABLES, timeout=180)
            assert d.terminate() == 0
        finally:
            d.kill9()
    fault_row.how_often = f"{points} kills, staging {staging_kind}: " + ", ".join(
        f"{n} {p}" for p, n in sorted(phases.items())
    )
    fault_row.peak_rss_mb = sampler.peak_mb
    fault_row.measured = (
        f"{writer.commits} writer txns; {apply_verified}/{apply_aimed} apply-aimed "
        f"kills verified before the batch commit; {comp.summary()}"
    )
    assert phases["snapshot"] >= 1, phases
    assert phases["streaming"] + phases["batch apply"] >= points // 3, phases
    assert apply_verified >= 1, (apply_verified, apply_aimed)
    assert sampler.peak_mb < RSS_LIMIT_MB
