"""Test helpers: write configs, run the daemon as a real process, compare staging with the source."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from replicator.staging import StagingStore, scalar_text, to_json

ROOT = Path(__file__).resolve().parent.parent


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def base_config(
    tmp: Path, erp_url: str, staging_url: str, tables: Sequence[str], **capture: Any
) -> Path:
    return write_config(
        tmp / "config.toml",
        {
            "erp": {"dsn": erp_url},
            "capture": {
                "mode": "logical",
                "tables": list(tables),
                "batch_ms": 50,
                "heartbeat_interval": 1,
                "status_interval": 1,
                **capture,
            },
            "staging": {"url": staging_url},
            "health": {"listen": "127.0.0.1:0"},
            "daemon": {"state_dir": str(tmp / "state")},
            "logging": {"format": "json"},
        },
    )


class DaemonProcess:
    """``sync-daemon run`` in a subprocess, output captured to a file."""

    def __init__(
        self, config: Path, log: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.log = log or config.with_suffix(".log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "sync_daemon.py"), "run", "--config", str(self.config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        fh.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def norm(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        v = v.astimezone(dt.UTC)
    return scalar_text(v)


def source_rows(
    erp_url: str, table: str, columns: Sequence[str], key: Sequence[str], where: str = "true"
) -> list[str]:
    cols = ", ".join(f'"{c}"' for c in columns)
    order = ", ".join(f'"{k}"' for k in key)
    with psycopg.connect(erp_url, options="-c timezone=UTC") as conn:
        rows = conn.execute(f"SELECT {cols} FROM {table} WHERE {where} ORDER BY {order}").fetchall()
    return [to_json([norm(v) for v in r]) for r in rows]


def staging_rows(staging_url: str, table: str) -> tuple[list[str], list[str], tuple[str, ...]]:
    store = StagingStore(staging_url)
    try:
        store.setup()
        info = store.mirror(table)
        if info is None:
            return [], [], ()
        cols = [c.name for c in info.schema.columns]
        rows = store.rows(table)
        # JSON text (SQLite) and decoded JSON (PostgreSQL) both normalise to the same JSON text.
        out = [to_json([norm(v) for v in r]) for r in rows]
        return out, cols, info.schema.key
    finally:
        store.dispose()


def wait_until(
    pred: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = ""
) -> None:
    """Poll ``pred`` until it holds; fail after ``timeout`` seconds.

    The first polls come quickly and the pause doubles up to ``interval``: many conditions hold
    within a few tenths of a second, and a test should not then sit out a whole interval, while
    a long wait still polls (an expensive ``pred``: a table compared) only every ``interval``."""
    deadline = time.monotonic() + timeout
    pause = min(interval, 0.05)
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(pause)
        pause = min(interval, pause * 2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")


def assert_staging_equals_source(
    erp_url: str,
    staging_url: str,
    tables: Sequence[str],
    timeout: float = 60,
    where: dict[str, str] | None = None,
) -> None:
    """Wait until every mirror equals its source table (the rows matching ``where[table]``, when
    given: a row filter) row by row, then assert it."""
    last: dict[str, Any] = {}

    def equal() -> bool:
        for t in tables:
            st, cols, key = staging_rows(staging_url, t)
            if not cols:
                return False
            src = source_rows(erp_url, t, cols, key, (where or {}).get(t, "true"))
            last[t] = (len(src), len(st))
            if src != st:
                last[t] = (
                    len(src),
                    len(st),
                    next(((a, b) for a, b in zip(src, st, strict=False) if a != b), None),
                )
                return False
        return True

    try:
        wait_until(equal, timeout, 0.5, "staging == source")
    except AssertionError:
        raise AssertionError(f"staging differs from source: {last}") from None
