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
    out, _ = proc.communicate(timeout=30)
    text = "".join(lines) + out
    assert "an embedded SQLite ERP captured by triggers" in text
    assert "capture erp (triggers" in text and "streaming" in text
    assert "Manage page http://127.0.0.1:" in text
    assert "everything it started is gone" in text
    assert proc.returncode == 0
