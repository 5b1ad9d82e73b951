"""The stream sink against real NATS servers: kill -9 between the PubAck and the cursor commit
leaves no duplicate in the stream; a NATS outage keeps the changes in the journal (pruning too)
and loses none; an R3 stream on a three-node cluster survives one node killed mid-burst."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.config import parse_config
from replicator.config.scale import StreamSection
from replicator.errors import ConfigError, RetryableError
from replicator.staging import StagingStore, to_json
from replicator.stream.sink import StreamSink
from tests.helpers import ROOT, norm, wait_until, write_config
from tests.natsserver import NatsNode, nats_node, start_cluster, stream_messages

__all__ = ["nats_node"]

ITEMS = TableSchema(
    "public",
    "items",
    (Column("id", "bigint"), Column("sku", "text"), Column("price", "numeric(12,2)")),
    ("id",),
)


def _write(store: StagingStore, first: int, n: int, lsn: int) -> None:
    """One staging commit of ``n`` changes, as capture makes them (positions increase)."""
    store.setup()
    store.ensure_mirror(ITEMS)
    with store.transaction("erp") as txn:
        for i in range(first, first + n):
            txn.apply(
                Change(
                    "public.items",
                    "U",
                    {"id": i % 700, "sku": f"S-{i}", "price": f"{i}.50"},
                    position=f"0/{lsn + i:X}",
                )
            )
            if i % 11 == 0:
                txn.apply(
                    Change(
                        "public.items", "D", key={"id": (i + 3) % 700}, position=f"0/{lsn + i:X}"
                    )
                )
        txn.commit(Checkpoint("erp", f"0/{lsn + first + n:X}"))


def _journal_count(store: StagingStore) -> int:
    with store.engine.connect() as c:
        return int(c.exec_driver_sql("SELECT COUNT(*) FROM sync_journal").scalar() or 0)


def _check_once(url: str, stream: str, expected: int) -> list[dict[str, object]]:
    msgs = stream_messages(url, stream)
    ids = Counter(h.get("Nats-Msg-Id") for _, h, _ in msgs)
    doubled = {k: n for k, n in ids.items() if n > 1}
    assert not doubled, f"messages in the stream more than once: {list(doubled.items())[:5]}"
    bodies = [json.loads(d) for _, _, d in msgs]
    changes = [b for b in bodies if b["op"] != "schema"]
    assert len(changes) == expected, (len(changes), expected)
    assert sorted(b["journal_id"] for b in changes) == list(range(1, expected + 1))
    return bodies


def test_kill9_between_puback_and_cursor_commit_leaves_no_duplicate(
    nats_node: NatsNode, tmp_path: Path
) -> None:
    staging = f"sqlite:///{tmp_path / 's.db'}"
    store = StagingStore(staging)
    _write(store, 0, 1500, 0x1000)
    total = _journal_count(store)
    worker = [
        sys.executable,
        str(ROOT / "tests" / "stream_worker.py"),
        staging,
        nats_node.url,
        "SYNC",
    ]
    killed = subprocess.run(
        [*worker, "kill-after-puback"], capture_output=True, timeout=120, text=True
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "killing myself after a PubAck" in killed.stdout
    # The round was stored by JetStream, the cursor did not move.
    assert store.journal_backlog("stream:SYNC")[0] == total
    stored = [
        b
        for _, _, d in stream_messages(nats_node.url, "SYNC")
        if (b := json.loads(d))["op"] != "schema"
    ]
    assert len(stored) == 200

    out = tmp_path / "worker.log"
    with out.open("w") as fh:
        proc = subprocess.Popen(worker, stdout=fh, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: store.journal_backlog("stream:SYNC")[0] == 0, 60, what="backlog 0")
            _write(store, 1500, 300, 0x9000)  # more changes while it runs
            total = _journal_count(store)
            wait_until(lambda: store.journal_backlog("stream:SYNC")[0] == 0, 60, what="backlog 0")
        finally:
            proc.terminate()
            proc.wait(20)
    log = out.read_text()
    # The republished round (200 changes and the table's schema event), dropped by JetStream.
    assert "duplicates 201" in log, log
    _check_once(nats_node.url, "SYNC", total)
    store.dispose()


def test_consumer_kill9_between_commit_and_ack_applies_each_change_once(
    nats_node: NatsNode, tmp_path: Path, staging_url: str
) -> None:
    """The mirror on SQLite and on PostgreSQL (``staging_url``), fed from SQLite staging."""
    store = StagingStore(f"sqlite:///{tmp_path / 's.db'}")
    _write(store, 0, 1500, 0x1000)
    sink = StreamSink(StreamSection(url=nats_node.url, stream="SYNC"), store)
    sink.run_cycle(threading.Event(), idle_wait=0)
    sink.close()
    mirror_url = staging_url
    cfg = write_config(
        tmp_path / "consume.toml",
        {
            "stream": {"url": nats_node.url, "stream": "SYNC"},
            "consumer": {"durable": "site2", "staging_url": mirror_url, "batch": 100},
        },
    )
    worker = [sys.executable, str(ROOT / "tests" / "stream_worker.py"), "consume", str(cfg)]
    killed = subprocess.run(
        [*worker, "kill-before-ack"], capture_output=True, timeout=120, text=True
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "killing myself before the ack, committed 100" in killed.stdout  # one batch
    mirror = StagingStore(mirror_url)
    last_seq = len(stream_messages(nats_node.url, "SYNC"))
    proc = subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: (
                (cp := mirror.load_checkpoint("stream:site2")) is not None
                and int(cp.position) == last_seq
            ),
            60,
            what="consumer caught up",
        )
    finally:
        proc.terminate()
        proc.wait(20)
    assert _normalized(mirror.rows("public.items")) == _normalized(store.rows("public.items"))
    with mirror.engine.connect() as c:
        journaled = c.exec_driver_sql("SELECT COUNT(*) FROM sync_journal").scalar()
    # The mirror's own journal: one entry per change applied, none applied twice.
    assert journaled == _journal_count(store)
    mirror.dispose()
    store.dispose()


def _normalized(rows: list[tuple[object, ...]]) -> list[str]:
    return [to_json([norm(v) for v in r]) for r in rows]


def test_nats_outage_keeps_changes_in_the_journal(tmp_path: Path) -> None:
    node = NatsNode(tmp_path, "solo").start()
    staging = f"sqlite:///{tmp_path / 's.db'}"
    store = StagingStore(staging)
    sink = StreamSink(StreamSection(url=node.url, stream="SYNC", timeout=2), store)
    stop = threading.Event()
    try:
        _write(store, 0, 100, 0x100)
        assert sink.run_cycle(stop, idle_wait=0)["published"] == _journal_count(store)
        node.stop()
        _write(store, 100, 400, 0x5000)
        with pytest.raises(RetryableError):
            sink.run_cycle(stop, idle_wait=0)
        waiting = store.journal_backlog("stream:SYNC")[0]
        assert waiting > 0
        assert "waiting for the stream" in sink.progress
        store.journal_prune(keep_seconds=0)  # housekeeping must not drop what is unpublished
        assert store.journal_backlog("stream:SYNC")[0] == waiting
        node.start()  # same port, same store directory
        wait_until(
            lambda: _try_cycle(sink, stop) and store.journal_backlog("stream:SYNC")[0] == 0,
            60,
            what="published after the outage",
        )
        remaining = _journal_count(store)  # the pruned prefix was published before the outage
        msgs = [json.loads(d) for _, _, d in stream_messages(node.url, "SYNC")]
        changes = [m for m in msgs if m["op"] != "schema"]
        assert len({m["journal_id"] for m in changes}) == len(changes)
        assert len(changes) >= remaining
        assert max(m["journal_id"] for m in changes) == _max_journal_id(store)
    finally:
        sink.close()
        store.dispose()
        node.stop()


def _try_cycle(sink: StreamSink, stop: threading.Event) -> bool:
    try:
        sink.run_cycle(stop, idle_wait=0)
        return True
    except RetryableError as exc:
        print("cycle failed:", exc)
        return False


def _max_journal_id(store: StagingStore) -> int:
    with store.engine.connect() as c:
        return int(c.exec_driver_sql("SELECT MAX(id) FROM sync_journal").scalar() or 0)


def test_r3_stream_survives_a_node_killed_during_a_burst(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path)
    staging = f"sqlite:///{tmp_path / 's.db'}"
    store = StagingStore(staging)
    urls = ",".join(n.url for n in nodes)
    cfg = StreamSection(url=urls, stream="SYNC3", replicas=3, timeout=5, batch=500)
    stop = threading.Event()
    sink: StreamSink | None = None
    try:

        def made() -> bool:
            nonlocal sink
            try:
                sink = sink or StreamSink(cfg, store)
                sink.bridge.connect()  # the cluster elects a meta leader first
                return True
            except RetryableError:
                return False

        wait_until(made, 60, interval=0.5, what="R3 stream created")
        assert sink is not None
        for burst in range(6):
            _write(store, burst * 1000, 1000, 0x10000 * (burst + 1))
            if burst == 2:
                nodes[0].kill()
            wait_until(
                lambda: _try_cycle(sink, stop) and store.journal_backlog("stream:SYNC3")[0] == 0,
                90,
                what=f"burst {burst} published",
            )
        _check_once(nodes[1].url, "SYNC3", _journal_count(store))
    finally:
        if sink is not None:
            sink.close()
        store.dispose()
        for n in nodes:
            n.stop()


def test_stream_and_ha_config_errors_name_the_key(tmp_path: Path) -> None:
    base = {"erp": {"dsn": "postgresql://erp@127.0.0.1/erp"}, "capture": {"tables": ["t"]}}
    with pytest.raises(ConfigError, match=r"c.toml: stream.url: must be nats://"):
        parse_config({**base, "stream": {"url": "http://x"}}, "c.toml")
    with pytest.raises(ConfigError, match=r"stream.subject_prefix = 'a.b'"):
        parse_config({**base, "stream": {"subject_prefix": "a.b"}}, "c.toml")
    with pytest.raises(ConfigError, match=r"ha.enabled: the lease lives in the staging store"):
        parse_config({**base, "ha": {"enabled": True, "node": "a"}}, "c.toml")
    with pytest.raises(ConfigError, match=r"node: a name for this daemon is required"):
        parse_config({**base, "ha": {"enabled": True}}, "c.toml")
