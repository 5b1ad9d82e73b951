"""Two daemon processes with the same config (staging on a shared PostgreSQL, each behind its own
TCP proxy), one active and one standby, publishing to JetStream, with a consumer mirroring the
stream. The active one is killed with kill -9 during a burst of orders; later the new active one
is partitioned from staging (blackhole: no RST) and healed. Each time the standby takes over
within 30 s, and at the end: staging equals the ERP, the consumer's mirror equals the ERP, the
stream holds each change once, and every e-number is in the ERP exactly once.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.config import parse_config
from replicator.ha import Fence, Lease, LeaseLost
from replicator.orders.ledger import Ledger, events_t
from replicator.staging import StagingStore
from tests.conftest import PgServer
from tests.emulators.orders import generate_orders
from tests.emulators.woocommerce import WooCommerceEmulator
from tests.faults.common import erp_e_numbers, ledger_states, orders_config
from tests.faults.proxy import TcpProxy
from tests.helpers import (
    ROOT,
    DaemonProcess,
    assert_staging_equals_source,
    base_config,
    wait_until,
)
from tests.natsserver import NatsNode, free_port, nats_node, stream_messages
from tests.test_orders_support import _pg_erp_template, pg_erp_url

__all__ = ["_pg_erp_template", "nats_node", "pg_erp_url"]

SKUS = [f"SKU-X{i}" for i in range(1, 21)]
# Short lease and shutdown budget: every takeover below waits for an expiry (lease_seconds) and
# the partitioned node's exit (lease - renew, then shutdown_timeout + 2 s); the waits are on
# conditions, so shorter values only make the test quicker, with a renewal budget of 3 s.
LEASE = 4.0
RENEW = 1.0
SHUTDOWN_TIMEOUT = 4.0
FINAL = {"delivered", "failed", "skipped"}


@pytest.fixture
def shared_staging(pg_server: PgServer) -> Iterator[str]:
    name = pg_server.createdb("hastaging")
    try:
        yield pg_server.url(name)
    finally:
        pg_server.dropdb(name)


def _proxied(url: str, proxy: TcpProxy) -> str:
    return re.sub(r"@([^/:]+):(\d+)/", f"@127.0.0.1:{proxy.port}/", url)


def _config(
    tmp: Path, node: str, erp: str, staging: str, nats: str, emu: WooCommerceEmulator
) -> tuple[Path, str]:
    d = tmp / node
    d.mkdir()
    cfg = orders_config(
        d,
        erp,
        [
            {
                "name": "web",
                "kind": "woocommerce",
                "url": emu.url,
                "timeout": 5,
                "consumer_key": emu.consumer_key,
                "consumer_secret": emu.consumer_secret,
            }
        ],
    )
    port = free_port()
    text = cfg.read_text()
    text = re.sub(r'\[staging\]\nurl = "[^"]*"', f'[staging]\nurl = "{staging}"', text)
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    text = text.replace("[daemon]\n", f"[daemon]\nshutdown_timeout = {SHUTDOWN_TIMEOUT}\n")
    text = text.replace(
        'tables = ["public.order_header"]', 'tables = ["public.order_header", "public.items"]'
    )
    text += (
        f'[ha]\nenabled = true\nnode = "{node}"\nlease_seconds = {LEASE}\nrenew_seconds = {RENEW}\n\n'
        f'[stream]\nurl = "{nats}"\nstream = "SYNC"\nsubject_prefix = "sync"\n'
    )
    cfg.write_text(text)
    return cfg, f"http://127.0.0.1:{port}"


def _readyz(base: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def _ha_detail(base: str) -> tuple[int, str]:
    status, body = _readyz(base)
    try:
        checks = {c["name"]: c for c in json.loads(body).get("checks", [])}
        return status, str(checks.get("ha", {}).get("detail", ""))
    except ValueError:
        return status, body


def _add_orders(emu: WooCommerceEmulator, n: int, first: int, seed: int) -> None:
    # An order is modified up to 120 s after it was created and a shop lists nothing modified
    # ahead of now: created from 150 s back, every order of a burst is listed at once (from 30 s
    # back, the last ones trickled in over 90 s and the test waited for the clock, not the daemon).
    emu.add_orders(
        generate_orders(
            n,
            seed=seed,
            start=datetime.now(UTC) - timedelta(seconds=150),
            spacing=timedelta(milliseconds=200),
            first_number=first,
            skus=SKUS,
        )
    )


def _settled(staging: str, emu: WooCommerceEmulator) -> bool:
    ledger = {e: st for (s, e), st in ledger_states(staging).items() if s == "web"}
    return {str(k) for k in emu.orders} <= set(ledger) and all(
        st in FINAL for st in ledger.values()
    )


class ItemWriter:
    """ERP changes beside the orders: items inserted, repriced and deleted, one per commit."""

    def __init__(self, erp: str) -> None:
        self.erp = erp
        self.stop = threading.Event()
        self.commits = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        with psycopg.connect(self.erp, autocommit=True) as c:
            while not self.stop.is_set():
                i += 1
                c.execute(
                    "INSERT INTO items VALUES (%s, %s, 'written during failover', %s)",
                    (f"HA{i}", f"HA-SKU-{i}", f"{i}.25"),
                )
                c.execute("UPDATE items SET price = price + 1 WHERE item_no = %s", (f"HA{i // 2}",))
                if i % 7 == 0:
                    c.execute("DELETE FROM items WHERE item_no = %s", (f"HA{i - 3}",))
                self.commits += 1
                self.stop.wait(0.01)

    def start(self) -> ItemWriter:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_standby_takes_over_after_kill9_and_partition(
    pg_erp_url: str, shared_staging: str, nats_node: NatsNode, tmp_path: Path
) -> None:
    erp = pg_erp_url
    host_port = re.search(r"@([^/:]+):(\d+)/", shared_staging)
    assert host_port
    proxies = {n: TcpProxy(host_port[1], int(host_port[2])).start() for n in ("a", "b")}
    emu = WooCommerceEmulator(products=[(s, f"Item {s}", 100) for s in SKUS])
    emu.start()
    _add_orders(emu, 20, 1001, 1)
    nodes: dict[str, DaemonProcess] = {}
    urls: dict[str, str] = {}
    for n in ("a", "b"):
        cfg, urls[n] = _config(
            tmp_path, n, erp, _proxied(shared_staging, proxies[n]), nats_node.url, emu
        )
        nodes[n] = DaemonProcess(cfg)
    mirror = f"sqlite:///{tmp_path / 'mirror.db'}"
    consume_cfg = tmp_path / "consume.toml"
    consume_cfg.write_text(
        f'[stream]\nurl = "{nats_node.url}"\nstream = "SYNC"\n\n'
        f'[consumer]\ndurable = "site2"\nstaging_url = "{mirror}"\n'
    )
    consumer: subprocess.Popen[bytes] | None = None
    writer: ItemWriter | None = None
    figures: dict[str, float] = {}
    try:
        nodes["a"].start()
        wait_until(lambda: _ha_detail(urls["a"])[1].startswith("active: a"), 60, what="a active")
        nodes["b"].start()
        wait_until(
            lambda: "standby (b); active: a" in _ha_detail(urls["b"])[1], 60, what="b standby"
        )
        assert _readyz(urls["b"])[0] == 503
        wait_until(lambda: "standby: b" in _ha_detail(urls["a"])[1], 30, what="a names b")
        status = subprocess.run(
            [
                sys.executable,
                str(ROOT / "sync_daemon.py"),
                "status",
                "--config",
                str(nodes["b"].config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "ha: active a" in status.stdout, status.stdout + status.stderr
        with urllib.request.urlopen(urls["a"] + "/fragments/replication", timeout=10) as r:
            page = r.read().decode()
        assert "ha: active a" in page and "node b standby" in page, page[-2000:]
        with (tmp_path / "consume.log").open("ab") as fh:
            consumer = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "sync_daemon.py"),
                    "consume",
                    "--config",
                    str(consume_cfg),
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

        writer = ItemWriter(erp).start()
        # 1. kill -9 of the active daemon during a burst of orders and ERP changes.
        _add_orders(emu, 40, 2001, 2)
        wait_until(
            lambda: sum(e.startswith("20") for _, e in ledger_states(shared_staging)) >= 10,
            60,
            interval=0.1,
            what="burst importing",
        )
        nodes["a"].kill9()
        t0 = time.monotonic()
        wait_until(lambda: _ha_detail(urls["b"])[1].startswith("active: b"), 90, what="b active")
        figures["takeover_after_kill9_s"] = time.monotonic() - t0
        wait_until(lambda: "streaming_started" in nodes["b"].output(), 90, what="b streaming")
        figures["streaming_after_kill9_s"] = time.monotonic() - t0
        nodes["a"].start()  # the supervisor restarts it: standby now
        wait_until(
            lambda: "standby (a); active: b" in _ha_detail(urls["a"])[1], 60, what="a standby"
        )

        # 2. the active one (b) partitioned from staging, without RST, during more orders.
        _add_orders(emu, 30, 3001, 3)
        proxies["b"].blackhole()
        t0 = time.monotonic()
        wait_until(lambda: _ha_detail(urls["a"])[1].startswith("active: a"), 90, what="a active")
        figures["takeover_after_partition_s"] = time.monotonic() - t0
        wait_until(lambda: "ha_lease_lost" in nodes["b"].output(), 90, what="b demoted")
        proxies["b"].restore()
        if not nodes["b"].alive():  # stuck on the dead link: exited 4, supervisor restarts it
            assert nodes["b"].wait(5) == 4
            nodes["b"].start()
        wait_until(
            lambda: "standby (b); active: a" in _ha_detail(urls["b"])[1], 60, what="b standby"
        )

        writer.close()
        assert writer.commits > 100
        wait_until(lambda: _settled(shared_staging, emu), 120, what="all orders settled")
        doubled = {e: k for e, k in erp_e_numbers(erp).items() if k != 1}
        assert not doubled, doubled
        tables = ["public.order_header", "public.items"]
        assert_staging_equals_source(erp, shared_staging, tables, timeout=60)
        assert_staging_equals_source(erp, mirror, tables, timeout=60)
    finally:
        if writer is not None:
            writer.close()
        if consumer is not None:
            consumer.terminate()
            consumer.wait(15)
        for p in proxies.values():
            p.restore()  # a node stuck on a blackholed link must not hide the test's own failure
        for n, d in nodes.items():
            if d.alive():
                try:
                    d.terminate(20)
                except subprocess.TimeoutExpired:
                    d.kill9()
                    print(f"node {n} ignored SIGTERM for 20 s; log tail:\n{d.output()[-3000:]}")
        emu.stop()
        for p in proxies.values():
            p.close()
    ids = Counter(h.get("Nats-Msg-Id") for _, h, _ in stream_messages(nats_node.url, "SYNC"))
    assert max(ids.values()) == 1
    # Takeover times are figures (docs/benchmarks.md), not assertions: a loaded machine is slower.
    print("HA figures:", {k: round(v, 1) for k, v in figures.items()})


def test_fence_refuses_staging_commits_of_a_deposed_node(shared_staging: str) -> None:
    """Capture's staging commit and the ledger writes of the node whose epoch moved fail in
    their own transaction, and nothing of them is visible; the new holder commits."""

    def cfg(node: str) -> Any:
        return parse_config(
            {
                "erp": {"dsn": "postgresql://erp@127.0.0.1/erp"},
                "capture": {"tables": ["public.t"]},
                "staging": {"url": shared_staging},
                "ha": {"enabled": True, "node": node, "lease_seconds": 3, "renew_seconds": 1},
            }
        )

    a, b = Lease(cfg("a")), Lease(cfg("b"))
    a.setup()
    store = StagingStore(shared_staging)
    store.setup()
    store.ensure_mirror(TableSchema("public", "t", (Column("id", "bigint"),), ("id",)))
    ledger = Ledger(shared_staging)
    fence = Fence(a, shared_staging)

    def capture_commit(i: int) -> None:
        with store.transaction("erp") as txn:
            txn.apply(Change("public.t", "U", {"id": i}, position=str(i)))
            txn.commit(Checkpoint("erp", str(i)))

    def ledger_write(i: int) -> None:
        with ledger.begin() as c:
            ledger.event(c, "web", f"E{i}", datetime.now(UTC).replace(tzinfo=None), "test")

    try:
        assert a.try_acquire() == 1 and b.try_acquire() is None
        fence.install()
        capture_commit(1)
        ledger_write(1)
        wait_until(lambda: b.try_acquire() is not None, 10, what="b takes over after expiry")
        with pytest.raises(LeaseLost):
            capture_commit(2)
        with pytest.raises(LeaseLost):
            ledger_write(2)
        fence.remove()
        fence = Fence(b, shared_staging)  # the new holder's process
        fence.install()
        capture_commit(3)
        assert store.rows("public.t") == [(1,), (3,)]
        with ledger.engine.connect() as c:
            assert sorted(r[0] for r in c.execute(sa.select(events_t.c.e_number))) == ["E1"]
        assert store.load_checkpoint("erp").position == "3"  # type: ignore[union-attr]
    finally:
        fence.remove()
        ledger.close()
        store.dispose()
        a.dispose()
        b.dispose()


def test_standby_tells_systemd_it_is_up_and_alive(
    erp_db: str, shared_staging: str, tmp_path: Path
) -> None:
    """A standby under systemd (Type=notify, WatchdogSec) sends READY=1 and keeps pinging the
    watchdog while another node holds the lease; /readyz says standby and names the holder."""

    with psycopg.connect(shared_staging, autocommit=True) as c:
        c.execute(
            "CREATE TABLE sync_ha_lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
            "epoch BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL, "
            "acquired_at TIMESTAMPTZ NOT NULL, renewed_at TIMESTAMPTZ NOT NULL)"
        )
        c.execute(
            "INSERT INTO sync_ha_lease VALUES ('sync-daemon', 'elsewhere', 41, "
            "now() + interval '1 hour', now(), now())"
        )
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cfg = base_config(tmp_path, erp_db, shared_staging, ["public.t"])
    port = free_port()
    cfg.write_text(
        cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        + '\n[ha]\nenabled = true\nnode = "solo"\n'
    )
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "3000000"}
    try:
        with DaemonProcess(cfg, env=env) as d:
            seen = [sock.recv(4096).decode() for _ in range(4)]
            assert any(m.startswith("READY=1") and "standby (solo)" in m for m in seen), seen
            assert "WATCHDOG=1" in seen, seen
            status, detail = _ha_detail(f"http://127.0.0.1:{port}")
            assert status == 503 and "active: elsewhere (epoch 41)" in detail, detail
            assert "capture_started" not in d.output()
    finally:
        sock.close()
