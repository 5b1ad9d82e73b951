"""The stream sink: every change committed to the staging journal, published to JetStream.

Exactly once, in three steps that each survive a crash:

1. read the journal after the sink's cursor (``sync_cursors``, consumer ``stream:{STREAM}``);
2. publish a round of entries with ``Nats-Msg-Id`` = source position + table + operation + key
   and wait for every PubAck (the server has stored it — on a quorum of an R3 stream);
3. only then move the cursor past the round.

A kill -9 between 2 and 3 publishes the round again after the restart with the same ids, and
JetStream drops them inside its duplicate window (``[stream] duplicate_window``). A NATS outage
makes step 2 fail: the cursor stays, the entries stay in the journal (pruning never deletes an
entry a cursor has not passed), the backlog is reported and alerted, and the next round retries.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import structlog

from replicator import metrics
from replicator.config.scale import StreamSection
from replicator.errors import RetryableError
from replicator.schedules import Schedule
from replicator.services import Service
from replicator.staging import StagingStore, to_json
from replicator.stream import wire
from replicator.stream.nats import NatsBridge

log = structlog.get_logger(__name__, service="stream")


def cursor_name(cfg: StreamSection) -> str:
    return f"stream:{cfg.stream}"


class StreamSink:
    """Publishes the journal of one staging store to one JetStream stream."""

    def __init__(self, cfg: StreamSection, store: StagingStore, name: str = "sync-daemon") -> None:
        self.cfg = cfg
        self.store = store
        self.cursor = cursor_name(cfg)
        self.bridge = NatsBridge(cfg, f"{name} stream sink")
        self._schemas: dict[str, str] = {}  # table -> definition published by this process
        self.published = 0
        self.duplicates = 0
        self.progress = ""
        store.setup()
        if self.cursor not in store.journal_cursors():
            # The cursor must exist before anything is pruned: pruning keeps what it has not read.
            store.journal_commit(self.cursor, 0)

    # ------------------------------------------------------------------ one cycle
    def run_cycle(self, stop: threading.Event, idle_wait: float = 1.0) -> dict[str, Any]:
        """Publish until the journal is drained (or ``stop``); wait up to ``idle_wait`` for new
        entries when there is nothing to publish, so the stream trails staging closely.

        Returns the journal entries published and the messages JetStream dropped as duplicates.
        """
        published = duplicates = rounds = 0
        deadline = time.monotonic() + idle_wait
        try:
            self.bridge.connect()
            # From the durable cursor every cycle: a round that failed is published again.
            reader = self.store.journal_reader(self.cursor)
            while not stop.is_set():
                entries = reader.read(self.cfg.batch)
                if not entries:
                    if rounds or time.monotonic() >= deadline:
                        break
                    stop.wait(0.02)
                    continue
                acks = self.publish(entries)
                # Every entry of the round is stored by the stream: only now the cursor moves.
                reader.commit(entries[-1]["id"])
                rounds += 1
                published += len(entries)
                duplicates += acks[1]
        finally:
            self._report()
        self.published += published
        self.duplicates += duplicates
        metrics.STREAM_PUBLISHED.labels(self.cfg.stream).inc(published)
        return {"published": published, "duplicates": duplicates}

    def publish(self, entries: list[dict[str, Any]]) -> tuple[int, int]:
        """Publish one round and wait for all its PubAcks: (stored, dropped as duplicates)."""
        messages, schemas = self._messages(entries)
        acks = self.bridge.call(
            self.bridge.publish_round(messages, self.cfg.timeout), self.cfg.timeout + 5
        )
        self._schemas.update(schemas)  # stored now: later rounds need not repeat them
        return acks

    def _messages(
        self, entries: list[dict[str, Any]]
    ) -> tuple[list[tuple[str, bytes, str]], dict[str, str]]:
        store, prefix = self.store, self.cfg.subject_prefix
        tables = {e["table"] for e in entries}
        if any(store.mirror(t) is None for t in tables):
            store.refresh_mirrors()
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        for t in tables:
            keys = [e["key"] for e in entries if e["table"] == t and e["op"] == "U" and e["key"]]
            rows[t] = store.rows_by_key(t, keys)
        out: list[tuple[str, bytes, str]] = []
        schemas: dict[str, str] = {}
        # Per table, once per round: its definition and one value encoder per column.
        per_table: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {}
        for e in entries:
            table, source = e["table"], e["source"]
            info = store.mirror(table)
            if info is None:
                continue  # a table no longer mirrored; nothing a consumer could apply
            known = per_table.get(table)
            if known is None:
                schema = info.schema
                known = per_table[table] = (
                    to_json(wire.schema_payload(schema)),
                    {c.name: wire.value_encoder(c) for c in schema.columns},
                    schema.key,
                )
            definition, enc, keycols = known
            subj = wire.subject(prefix, source, table)
            if (schemas.get(table) or self._schemas.get(table)) != definition:
                schemas[table] = definition
                out.append(
                    (
                        subj,
                        wire.encode(
                            {
                                "op": "schema",
                                "source": source,
                                "table": table,
                                "schema": wire.schema_payload(info.schema),
                                "position": e["position"],
                            }
                        ),
                        wire.schema_msg_id(source, table, definition),
                    )
                )
            k = e["key"]
            row = rows[table].get(e["key_text"]) if e["op"] == "U" else None
            body = {
                "op": e["op"],
                "source": source,
                "table": table,
                "key": {c: enc[c](v) for c, v in zip(keycols, k, strict=False)} if k else None,
                "row": {c: enc[c](v) if c in enc else v for c, v in row.items()}
                if row is not None
                else None,
                "position": e["position"],
                "journal_id": e["id"],
                "staged_at": e["at"],
            }
            out.append(
                (
                    subj,
                    wire.encode(body),
                    wire.msg_id(source, e["position"], table, e["op"], e["key_text"]),
                )
            )
        return out, schemas

    def _report(self) -> None:
        try:
            n, oldest = self.store.journal_backlog(self.cursor)
        except Exception as exc:  # staging briefly unreachable: the next round reports
            log.debug("stream_backlog_unknown", error=str(exc))
            return
        lag = 0.0
        if oldest is not None:
            at = dt.datetime.fromisoformat(oldest) if isinstance(oldest, str) else oldest
            lag = max(0.0, (dt.datetime.now(dt.UTC) - at).total_seconds())
        metrics.STREAM_BACKLOG.labels(self.cfg.stream).set(n)
        metrics.STREAM_LAG_SECONDS.labels(self.cfg.stream).set(lag)
        self.progress = f"{n} change(s) waiting for the stream, oldest {lag:.1f} s"
        if n > self.cfg.max_backlog:
            raise RetryableError(
                f"{n} changes wait for JetStream (more than stream.max_backlog = "
                f"{self.cfg.max_backlog}); they stay in the journal until NATS takes them"
            )

    def close(self) -> None:
        self.bridge.close()


def stream_service(cfg: Any, store: StagingStore, stop: threading.Event) -> Any:
    """The ``stream`` service of the daemon (continuous; failures are alerted by the runner)."""
    sink = StreamSink(cfg.stream, store, cfg.daemon.name)

    def run(_now: dt.datetime) -> str:
        r = sink.run_cycle(stop)
        return f"{r['published']} published, {r['duplicates']} duplicates dropped"

    return Service(
        "stream",
        Schedule.parse("continuous"),
        run,
        progress=lambda: sink.progress,
        close=sink.close,
    )
