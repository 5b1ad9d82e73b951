"""`make demo` works: the embedded-SQLite fallback (forced here; the PostgreSQL path is what the
other end-to-end tests run) starts, captures, prints status, and Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "SYNC_DEMO_ERP": "sqlite", "SYNC_DEMO_STATE": str(tmp_path / "demo")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator.demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 90
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "changes applied" in line and any("ERP writer" in x for x in lines):
            break
    proc.send_signal(signal.SIGINT)
    # The demo gives the daemon 15 s to stop, then kills it, then stops the shop and the ERP:
    # on a busy machine that takes a while, and still ends.
    out, _ = proc.communicate(timeout=90)
    text = "".join(lines) + out
    assert "an embedded SQLite ERP captured by triggers" in text
    assert "capture streaming (triggers)" in text
    # A compact line every 5 s, not a status block of 30-70 lines.
    status_lines = [x for x in lines if "ERP writer" in x]
    assert status_lines and all(x.count("\n") == 1 and len(x) < 300 for x in status_lines)
    assert "Manage page http://127.0.0.1:" in text
    assert "everything it started is gone" in text
    assert proc.returncode == 0


def test_demo_order_mix_shows_every_fate_at_once() -> None:
    """The first six orders of the sample shop: imported, failed, skipped for two reasons."""
    from replicator.config.orders import ImportCriteria
    from replicator.demo import SKUS, demo_order
    from replicator.orders.decision import check_criteria
    from tests.emulators import WooCommerceEmulator

    shop = WooCommerceEmulator()
    fates = []
    for n in range(1, 7):
        o = demo_order(n)
        payload = shop.put_order(o)
        why = check_criteria(ImportCriteria(), payload, None)
        unknown = [ln.sku for ln in o.lines if ln.sku not in SKUS]
        fates.append("failed" if why is None and unknown else why or "imported")
    assert fates[:2] == ["imported", "failed"], fates
    assert any("not paid yet" in f for f in fates)
    assert any("status 'on-hold'" in f for f in fates)
    assert fates.count("imported") == 3
