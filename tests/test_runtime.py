"""The running parts of a daemon (replicator.runtime) and the capture supervisor, in process.

Each part decides on reload what it restarts; the daemon's loop only asks. The last test runs a
whole daemon in a thread against an ERP that refuses connections: the HTTP server, the checks
and the shutdown all come from the runtime.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from replicator.cdc.supervisor import Backoff, CaptureSupervisor
from replicator.config import Config, load_config
from replicator.daemon import Daemon
from replicator.ops.readmodel import collect_status
from replicator.runtime import ServiceSet
from replicator.state import DaemonState
from tests.helpers import wait_until, write_config


def _config(tmp_path: Path, name: str = "config.toml", **capture: Any) -> Path:
    return write_config(
        tmp_path / name,
        {
            # Port 1 refuses at once: capture keeps retrying, nothing else needs the ERP.
            "erp": {"dsn": "postgresql://sync@127.0.0.1:1/erp", "connect_timeout": 2},
            "capture": {"mode": "logical", "tables": ["public.items"], **capture},
            "staging": {"url": f"sqlite:///{tmp_path / 'staging.db'}"},
            "health": {"listen": "127.0.0.1:0"},
            "daemon": {"state_dir": str(tmp_path / "state"), "shutdown_timeout": 4},
            "logging": {"format": "json"},
        },
    )


def _load(tmp_path: Path, name: str = "config.toml", **capture: Any) -> Config:
    return load_config(_config(tmp_path, name, **capture))


class _FakeSource:
    name = "erp"

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_capture_restarts_only_when_its_sections_change(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    store: Any = object()  # not touched by reload
    sup = CaptureSupervisor(cfg, store, DaemonState(), threading.Event(), lambda: None)
    source = _FakeSource()
    sup.source = source  # type: ignore[assignment]
    assert sup.reload(_load(tmp_path, "same.toml"), store) is False
    assert sup.source is source and not source.closed
    assert sup.reload(_load(tmp_path, "other.toml", heartbeat_interval=7), store) is True
    assert sup.source is None and source.closed


def test_services_rebuild_when_a_section_they_read_changes(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert not ServiceSet.changed(cfg, _load(tmp_path, "same.toml"))
    assert ServiceSet.changed(cfg, _load(tmp_path, "other.toml", heartbeat_interval=7))


def test_backoff_is_capped_and_resets() -> None:
    b = Backoff(base=1.0, cap=4.0)
    delays = [b.next() for _ in range(10)]
    assert all(0.1 <= d <= 4.1 for d in delays)
    b.reset()
    assert b.next() <= 1.1


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def test_daemon_serves_checks_while_the_erp_refuses_and_stops_cleanly(tmp_path: Path) -> None:
    path = _config(tmp_path)
    daemon = Daemon(str(path))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.health is not None, 20, what="HTTP server listening")
        assert daemon.health is not None
        base = daemon.health.url
        wait_until(lambda: daemon.state.last_error != "", 20, what="capture retrying")
        status, body = _get(base + "/readyz")
        assert status == 503
        checks = {c["name"]: c for c in body["checks"]}
        assert set(checks) == {
            "staging",
            "erp",
            "capture",
            "lag",
            "heartbeat",
            "breakers",
            "orders",
        }
        assert checks["staging"]["ok"] is True
        assert checks["capture"]["ok"] is False
        assert checks["capture"]["detail"].startswith("not capturing:")
        assert checks["orders"]["detail"] == "order import off"
        assert _get(base + "/healthz")[0] == 200
        status, text = _get(base + "/metrics")
        assert status == 200 and "sync_loop_duration_seconds" in text
    finally:
        daemon.stop.set()
        thread.join(30)
    assert result == [0]
    # The last mark in staging: a clean stop, which ``status`` reads from another process.
    st = collect_status(load_config(path))
    assert st["daemon"]["running"] is False and st["daemon"]["reason"] == "stopped"
