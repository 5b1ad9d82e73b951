"""The stream sink in a process of its own, for the kill -9 test.

``python tests/stream_worker.py STAGING_URL NATS_URL STREAM [kill-after-puback]``: publishes the
journal until SIGTERM/SIGKILL. With ``kill-after-puback`` the process sends itself SIGKILL at
the first cursor commit, i.e. after JetStream's PubAck for a round and before the cursor moved:
the crash window the duplicate window has to cover.
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
from replicator.stream.sink import StreamSink


def main() -> None:
    staging, url, stream = sys.argv[1:4]
    kill = len(sys.argv) > 4 and sys.argv[4] == "kill-after-puback"
    store = StagingStore(staging)
    sink = StreamSink(StreamSection(url=url, stream=stream, batch=200), store)
    if kill:

        def die(_consumer: str, _journal_id: int) -> None:
            print("killing myself after a PubAck", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        store.journal_commit = die  # type: ignore[method-assign]
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
