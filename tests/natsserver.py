"""Throwaway NATS servers with JetStream for the stream tests: one node, or a three-node cluster,
on free loopback ports, data under the test's tmp directory; stopped and removed afterwards."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
import pytest

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsNode:
    def __init__(self, base: Path, name: str, cluster_ports: list[int] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster_port = free_port() if cluster_ports is not None else 0
        self.peers = cluster_ports
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}',
        ]
        if self.peers is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.peers)
            lines.append(
                f'cluster {{ name: "c1", listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}'
            )
        return "\n".join(lines) + "\n"

    def start(self) -> NatsNode:
        conf = self.dir / "nats.conf"
        conf.write_text(self.config())
        log = (self.dir / "nats.log").open("ab")
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} did not start: {self.dir / 'nats.log'}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cluster(base: Path, n: int = 3) -> list[NatsNode]:
    nodes = [NatsNode(base, f"n{i}", []) for i in range(n)]
    for node in nodes:
        node.peers = [o.cluster_port for o in nodes if o is not node]
    for node in nodes:
        node.start()
    return nodes


@pytest.fixture
def nats_node(tmp_path: Path) -> Any:
    if not Path(NATS_SERVER).exists():
        pytest.skip("no nats-server binary")
    node = NatsNode(tmp_path, "solo").start()
    try:
        yield node
    finally:
        node.stop()


def stream_messages(url: str, stream: str) -> list[tuple[int, dict[str, str], bytes]]:
    """Every message of ``stream`` (sequence, headers, data), read with a throwaway consumer."""

    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    m = await js.get_msg(stream, seq)
                except nats.js.errors.NotFoundError:
                    continue
                out.append((seq, dict(m.headers or {}), m.data or b""))
            return out
        finally:
            await nc.close()

    return asyncio.run(run())
