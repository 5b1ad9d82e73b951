"""End to end through real processes: the daemon captures the ERP (logical replication) and
publishes to JetStream; ``sync-daemon consume`` keeps a second mirror from the stream, with no
slot on the ERP. The consumer is killed with kill -9 during a burst and restarted; at the end
staging and the consumer's mirror both equal the source, and the stream holds each change once.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import psycopg

from tests.helpers import (
    ROOT,
    DaemonProcess,
    assert_staging_equals_source,
    base_config,
    toml_value,
    wait_until,
    write_config,
)
from tests.natsserver import NatsNode, nats_node, stream_messages

__all__ = ["nats_node"]

SCHEMA = """
CREATE TABLE items (
    id bigint PRIMARY KEY, sku text NOT NULL, qty integer, price numeric(12,2), active boolean,
    at timestamptz, attrs jsonb
);
INSERT INTO items SELECT g, 'SKU-' || g, g, g * 1.25, g % 2 = 0, now(), jsonb_build_object('g', g)
FROM generate_series(1, 300) g;
"""


def add_section(cfg: Path, name: str, body: dict[str, object]) -> None:
    lines = [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in body.items()), ""]
    cfg.write_text(cfg.read_text() + "\n" + "\n".join(lines))


def burst(erp: str, seed: int, n: int) -> None:
    with psycopg.connect(erp, autocommit=True) as c:
        for i in range(n):
            k = (seed * 7919 + i * 31) % 400 + 1
            with c.transaction():
                c.execute(
                    "INSERT INTO items VALUES (%s, %s, %s, %s, %s, now(), %s) ON CONFLICT (id) DO "
                    "UPDATE SET qty = items.qty + 1, price = excluded.price, at = now()",
                    (k, f"SKU-{k}", i, f"{i}.75", i % 3 == 0, f'{{"b": {i}}}'),
                )
                if i % 5 == 0:
                    c.execute("DELETE FROM items WHERE id = %s", ((k * 3) % 400 + 1,))


def consume_proc(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "sync_daemon.py"), "consume", "--config", str(cfg)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def test_daemon_publishes_and_consumer_mirrors_exactly_once(
    erp_db: str, tmp_path: Path, nats_node: NatsNode
) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute(SCHEMA)
    staging = f"sqlite:///{tmp_path / 'staging.db'}"
    mirror = f"sqlite:///{tmp_path / 'mirror.db'}"
    cfg = base_config(tmp_path, erp_db, staging, ["public.items"])
    add_section(cfg, "stream", {"url": nats_node.url, "stream": "SYNC", "subject_prefix": "sync"})
    ccfg = write_config(
        tmp_path / "consume.toml",
        {
            "stream": {"url": nats_node.url, "stream": "SYNC", "subject_prefix": "sync"},
            "consumer": {"durable": "site2", "staging_url": mirror, "batch": 100},
            "logging": {"format": "json"},
        },
    )
    clog = tmp_path / "consume.log"
    with DaemonProcess(cfg) as d:
        wait_until(lambda: "streaming_started" in d.output(), 60, what="capture streaming")
        consumer = consume_proc(ccfg, clog)
        try:
            writer = threading.Thread(target=burst, args=(erp_db, 1, 600))
            writer.start()
            wait_until(lambda: _mirror_count(tmp_path / "mirror.db") > 0, 60, what="mirror filling")
            consumer.kill()  # kill -9 in the middle of the burst
            consumer.wait(10)
            writer.join()
            consumer = consume_proc(ccfg, clog)
            burst(erp_db, 2, 200)
            assert_staging_equals_source(erp_db, staging, ["public.items"], timeout=90)
            assert_staging_equals_source(erp_db, mirror, ["public.items"], timeout=90)
        finally:
            consumer.terminate()
            consumer.wait(15)
        assert "Traceback" not in clog.read_text(), clog.read_text()[-3000:]
    ids = Counter(h.get("Nats-Msg-Id") for _, h, _ in stream_messages(nats_node.url, "SYNC"))
    assert ids and max(ids.values()) == 1


def _mirror_count(path: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(path) as c:
            return int(c.execute("SELECT count(*) FROM items").fetchone()[0])
    except sqlite3.Error:
        return 0
