"""The stream sink and the stream consumer in a process of their own, for the kill -9 tests.

``python tests/stream_worker.py STAGING_URL NATS_URL STREAM [kill-after-puback]``: publishes the
journal until SIGTERM/SIGKILL. With ``kill-after-puback`` the process sends itself SIGKILL at
the first cursor commit, i.e. after JetStream's PubAck for a round and before the cursor moved:
the crash window the duplicate window has to cover.

``python tests/stream_worker.py consume CONFIG [kill-before-ack]``: runs the consumer; with
``kill-before-ack`` it sends itself SIGKILL after its first staging commit, before the ack.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replicator.config.scale import StreamSection
from replicator.staging import StagingStore
from replicator.stream.consumer import StreamConsumer, load_consume_config
from replicator.stream.sink import StreamSink


def consume() -> None:
    cfg = load_consume_config(sys.argv[2])
    consumer = StreamConsumer(cfg)
    if len(sys.argv) > 3 and sys.argv[3] == "kill-before-ack":

        async def die(_msgs: list[object]) -> None:
            print(f"killing myself before the ack, committed {consumer.committed()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        consumer._ack = die  # type: ignore[method-assign]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer.run(stop)
    consumer.close()


def main() -> None:
    if sys.argv[1] == "consume":
        consume()
        return
    staging, url, stream = sys.argv[1:4]
    kill = len(sys.argv) > 4 and sys.argv[4] == "kill-after-puback"
    store = StagingStore(staging)
    sink = StreamSink(StreamSection(url=url, stream=stream, batch=200), store)
    if kill:

        def die(_consumer: str, _journal_id: int) -> None:
            print("killing myself after a PubAck", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        store.journal.commit = die  # type: ignore[method-assign]  # the cursor's one writer
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("started", flush=True)
    while not stop.is_set():
        r = sink.run_cycle(stop, idle_wait=0.2)
        if r["published"] or r["duplicates"]:
            print(f"published {r['published']} duplicates {r['duplicates']}", flush=True)
    sink.close()
    store.dispose()


if __name__ == "__main__":
    main()
