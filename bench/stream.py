"""Benchmark: the change stream on NATS JetStream, in one run.

  capture  — N changes applied into SQLite staging alone (ApplyTxn, journal on, batches of
             5,000): the reference the sink has to keep up with;
  R1 / R3  — the same journal published by :class:`replicator.stream.sink.StreamSink` to a
             file-storage stream with one replica (one server) and three replicas (a
             three-node cluster): changes/s from the first round to the drained journal;
  lag      — a writer commits changes into staging at a fixed rate (default 5,000/s) while the
             sink publishes (R1) and a ``consume`` process's code (StreamConsumer) applies them
             into a second SQLite store; per change, staging commit → consumer mirror commit,
             p50/p99.

The NATS servers are started here on free loopback ports and removed afterwards. Failover time
comes from ``tests/test_ha.py`` (it prints ``HA figures``). Nothing is asserted.

Usage: python bench/stream.py [--changes 100000] [--rate 5000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicator.changes import Change, Checkpoint, Column, TableSchema  # noqa: E402
from replicator.config.scale import ConsumeConfig, StreamSection  # noqa: E402
from replicator.staging import StagingStore  # noqa: E402
from replicator.stream.consumer import StreamConsumer  # noqa: E402
from replicator.stream.sink import StreamSink  # noqa: E402
from tests.natsserver import NatsNode, start_cluster  # noqa: E402

ITEMS = TableSchema(
    "public",
    "items",
    (
        Column("id", "bigint"),
        Column("sku", "text"),
        Column("qty", "integer"),
        Column("price", "numeric(12,2)"),
        Column("note", "text"),
    ),
    ("id",),
)


def capture(store: StagingStore, n: int, batch: int = 5000, first: int = 0) -> float:
    """Apply ``n`` changes (distinct keys) into staging; seconds taken."""
    store.setup()
    store.ensure_mirror(ITEMS)
    t0 = time.perf_counter()
    for start in range(first, first + n, batch):
        with store.transaction("erp") as txn:
            for i in range(start, min(start + batch, first + n)):
                txn.apply(
                    Change(
                        "public.items",
                        "U",
                        {
                            "id": i,
                            "sku": f"SKU-{i}",
                            "qty": i % 100,
                            "price": f"{i % 997}.25",
                            "note": "x" * 40,
                        },
                        position=f"0/{i + 1:X}",
                    )
                )
            txn.commit(Checkpoint("erp", f"0/{start + batch:X}"))
    return time.perf_counter() - t0


def publish(store: StagingStore, cfg: StreamSection) -> tuple[float, int]:
    sink = StreamSink(cfg, store)
    deadline = time.monotonic() + 60
    while True:  # a fresh cluster elects its meta leader first
        try:
            sink.bridge.connect()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    t0 = time.perf_counter()
    r = sink.run_cycle(threading.Event(), idle_wait=0)
    took = time.perf_counter() - t0
    sink.close()
    return took, r["published"]


def lag(tmp: Path, url: str, rate: int, seconds: float) -> list[float]:
    store = StagingStore(f"sqlite:///{tmp / 'lag-staging.db'}")
    store.setup()
    store.ensure_mirror(ITEMS)
    stop = threading.Event()
    sink = StreamSink(StreamSection(url=url, stream="LAG", subject_prefix="lag", batch=2000), store)
    ccfg = ConsumeConfig.model_validate(
        {
            "stream": {"url": url, "stream": "LAG", "subject_prefix": "lag"},
            "consumer": {"durable": "bench", "staging_url": f"sqlite:///{tmp / 'lag-mirror.db'}"},
        }
    )
    consumer = StreamConsumer(ccfg)
    committed: dict[int, float] = {}  # journal-free bookkeeping: key -> staging commit time
    applied: dict[int, float] = {}

    def sink_loop() -> None:
        while not stop.is_set():
            sink.run_cycle(stop, idle_wait=0.05)

    orig_apply = consumer.apply

    def timed_apply(msgs: list[object]) -> int:
        n = orig_apply(msgs)  # committed when it returns
        now = time.perf_counter()
        for m in msgs:
            body = m.data  # type: ignore[attr-defined]
            if b'"op":"U"' in body:
                key = int(body.split(b'"key":{"id":', 1)[1].split(b"}", 1)[0])
                applied.setdefault(key, now)
        return n

    consumer.apply = timed_apply  # type: ignore[method-assign]

    def consume_loop() -> None:
        while not stop.is_set():
            consumer.run_once()

    threads = [threading.Thread(target=sink_loop), threading.Thread(target=consume_loop)]
    for t in threads:
        t.start()
    # The writer: one staging commit every 10 ms with rate/100 changes, as capture batches do.
    per = max(1, rate // 100)
    key = 10_000_000
    t_end = time.perf_counter() + seconds
    next_at = time.perf_counter()
    while time.perf_counter() < t_end:
        with store.transaction("erp") as txn:
            for _ in range(per):
                txn.apply(
                    Change(
                        "public.items",
                        "U",
                        {"id": key, "sku": f"S{key}", "qty": 1, "price": "1.00", "note": "y"},
                        position=f"1/{key:X}",
                    )
                )
                key += 1
            txn.commit(Checkpoint("erp", f"1/{key:X}"))
        now = time.perf_counter()
        for k in range(key - per, key):
            committed[k] = now
        next_at += 0.01
        time.sleep(max(0.0, next_at - time.perf_counter()))
    deadline = time.perf_counter() + 60
    while len(applied) < len(committed) and time.perf_counter() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    sink.close()
    consumer.close()
    store.dispose()
    return sorted(applied[k] - committed[k] for k in committed if k in applied)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    n = args.changes
    try:
        store = StagingStore(f"sqlite:///{tmp / 'staging.db'}")
        took = capture(store, n)
        print(f"capture into SQLite staging alone: {n} changes in {took:.2f} s = {n / took:,.0f}/s")
        solo = NatsNode(tmp, "solo").start()
        try:
            took, pub = publish(store, StreamSection(url=solo.url, stream="R1", batch=5000))
            print(
                f"published, R1 file storage:        {pub} changes in {took:.2f} s = {pub / took:,.0f}/s"
            )
            lags = lag(tmp, solo.url, args.rate, args.seconds)
        finally:
            solo.stop()
        store.dispose()
        store = StagingStore(f"sqlite:///{tmp / 'staging.db'}")
        cluster = start_cluster(tmp / "c")
        try:
            took, pub = publish(
                store,
                StreamSection(
                    url=",".join(c.url for c in cluster), stream="R3", replicas=3, batch=5000
                ),
            )
            print(
                f"published, R3 file storage:        {pub} changes in {took:.2f} s = {pub / took:,.0f}/s"
            )
        finally:
            for c in cluster:
                c.stop()
        store.dispose()
        if lags:
            p50 = statistics.median(lags) * 1000
            p99 = lags[int(len(lags) * 0.99) - 1] * 1000
            print(
                f"staging commit -> consumer mirror at {args.rate}/s for {args.seconds:g} s: "
                f"{len(lags)} changes, p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {lags[-1] * 1000:.0f} ms"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
