"""Throwaway PostgreSQL clusters from the local server binaries, for tests, benchmarks and the demo.

A cluster is initialised in a temporary folder with ``wal_level=logical``, started on a free
loopback port with trust authentication, and removed on ``stop()``. When run as root the server
runs as the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` with ``initdb``, or ``$PG_BINDIR``."""
    env = os.environ.get("PG_BINDIR")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """One throwaway PostgreSQL cluster."""

    def __init__(
        self, *, settings: dict[str, str] | None = None, bindir: Path | None = None
    ) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError("no PostgreSQL server binaries found (set PG_BINDIR)")
        self.bindir = found
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sync-daemon-pg-"))
        self.datadir = self.root / "data"
        self.settings = {
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "max_connections": "100",
            "fsync": "off",
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "max_slot_wal_keep_size": "4GB",
            "wal_sender_timeout": "60s",
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "port": str(self.port),
            "log_min_messages": "warning",
            **(settings or {}),
        }
        self._as_root = os.geteuid() == 0
        self.started = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(
            cmd, check=check, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )

    def init(self) -> LocalCluster:
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o755)
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        with (self.datadir / "postgresql.conf").open("a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")
        with (self.datadir / "pg_hba.conf").open("a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")
        return self

    def start(self, timeout: float = 30) -> LocalCluster:
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
        )
        self.started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)
            self.started = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def createdb(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "server.log").read_text().splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def local_cluster(settings: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    cluster = LocalCluster(settings=settings).init()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def wait_port(host: str, port: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        time.sleep(0.05)
    return False
