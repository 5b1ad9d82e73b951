"""``sync-daemon consume``: a mirror kept from the change stream, with no slot on the ERP.

Exactly once: each fetched batch of messages is applied in one staging transaction that also
writes the checkpoint ``stream:{durable}`` = the last stream sequence applied; the messages are
acknowledged only after that commit. A message whose sequence is at or below the checkpoint
(redelivered after a crash between the commit and the ack) is acknowledged and skipped.

The checkpoint in the mirror's staging store is the truth, the durable consumer on the server
only a cursor: at start the durable is re-created to deliver from the sequence after the
checkpoint, so nothing the mirror has not committed is skipped and nothing is delivered out of
order (a durable left with unacknowledged messages would redeliver them after newer ones).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import nats
import structlog
from nats.js import api
from pydantic import ValidationError

from replicator.changes import Change, Checkpoint
from replicator.config import format_validation_error
from replicator.config.scale import ConsumeConfig
from replicator.errors import ConfigError, FatalError, RetryableError
from replicator.staging import StagingStore
from replicator.stream import wire
from replicator.stream.nats import NatsBridge

log = structlog.get_logger(__name__, service="consume")


def load_consume_config(path: str) -> ConsumeConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    try:
        return ConsumeConfig.model_validate({**data, "source_path": str(p.resolve())})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(p), exc)) from None


class StreamConsumer:
    """One durable pull consumer feeding one staging store."""

    def __init__(self, cfg: ConsumeConfig) -> None:
        self.cfg = cfg
        c = cfg.consumer
        self.store = StagingStore(c.staging_url.get_secret_value(), role="consume")
        self.bridge = NatsBridge(cfg.stream, f"sync-daemon consume {c.durable}")
        self.checkpoint = f"stream:{c.durable}"
        self.filter = f"{cfg.stream.subject_prefix}.{c.source}.>"
        self._sub: Any = None
        self.applied = 0
        self.lag_seconds: float | None = None

    def committed(self) -> int:
        cp = self.store.load_checkpoint(self.checkpoint)
        return int(cp.position) if cp else 0

    def _subscribe(self) -> None:
        self.bridge.connect()
        self._sub = self.bridge.call(self._bind(self.committed()), self.cfg.stream.timeout + 5)

    async def _bind(self, after: int) -> Any:
        js, c = self.bridge.js, self.cfg.consumer
        stream = self.cfg.stream.stream
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, c.durable)
        config = api.ConsumerConfig(
            durable_name=c.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if after else api.DeliverPolicy.ALL,
            opt_start_seq=after + 1 if after else None,
            ack_wait=300,  # a batch is acked right after its commit; never redelivered meanwhile
            max_ack_pending=c.batch * 2,
            filter_subject=self.filter,
        )
        return await js.pull_subscribe(self.filter, durable=c.durable, stream=stream, config=config)

    async def _fetch(self) -> list[Any]:
        try:
            return list(await self._sub.fetch(self.cfg.consumer.batch, timeout=1))
        except nats.errors.TimeoutError:
            return []

    async def _ack(self, msgs: list[Any]) -> None:
        for m in msgs:
            await m.ack()

    def run_once(self) -> int:
        """Fetch one batch, apply it, commit, ack: the number of changes applied."""
        if self._sub is None:
            self._subscribe()
        msgs = self.bridge.call(self._fetch(), self.cfg.stream.timeout + 5)
        if not msgs:
            return 0
        n = self.apply(msgs)
        # Committed: only now the server may forget these messages.
        self.bridge.call(self._ack(msgs), self.cfg.stream.timeout + 5)
        return n

    def apply(self, msgs: list[Any]) -> int:
        after = self.committed()
        last = after
        n = 0
        staged_at = None
        with self.store.transaction(self.checkpoint) as txn:
            for m in msgs:
                seq = m.metadata.sequence.stream
                if seq <= last:
                    continue  # redelivered after a crash between our commit and the ack
                last = seq
                try:
                    body = wire.decode(m.data)
                except ValueError as exc:
                    raise FatalError(f"stream message {seq} on {m.subject}: {exc}") from None
                table = body["table"]
                if body["op"] == "schema":
                    txn.flush()
                    self.store.ensure_mirror(
                        wire.schema_from_payload(table, body["schema"]), txn.conn
                    )
                    continue
                if self.store.mirror(table) is None:
                    raise FatalError(
                        f"stream message {seq}: no schema event for {table} before its changes "
                        "(the stream's retention dropped it); start the consumer on a new "
                        "durable after the sink republished the schema (restart the daemon)"
                    )
                staged_at = body.get("staged_at")
                txn.apply(_change(body, seq))
                n += 1
            if last == after:
                return 0
            txn.commit(Checkpoint(self.checkpoint, str(last)))
        self.applied += n
        if staged_at:
            at = dt.datetime.fromisoformat(staged_at)
            if at.tzinfo is None:
                at = at.replace(tzinfo=dt.UTC)
            self.lag_seconds = (dt.datetime.now(dt.UTC) - at).total_seconds()
        return n

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop``; a lost NATS or staging connection is retried."""
        last_log = time.monotonic()
        since = 0
        while not stop.is_set():
            try:
                since += self.run_once()
            except RetryableError as exc:
                log.warning("consume_interrupted", error=str(exc))
                self._sub = None
                self.bridge.close_connection()
                stop.wait(1)
            if time.monotonic() - last_log >= 30:
                log.info(
                    "consume_summary",
                    changes=since,
                    position=self.committed(),
                    lag_seconds=self.lag_seconds and round(self.lag_seconds, 3),
                )
                since, last_log = 0, time.monotonic()

    def close(self) -> None:
        self.bridge.close()
        self.store.dispose()


def _change(body: dict[str, Any], seq: int) -> Change:
    table, op = body["table"], body["op"]
    pos = str(seq)
    if op == "T":
        return Change(table, "T", position=pos)
    if op == "U" and body.get("row") is not None:
        return Change(table, "U", values=body["row"], position=pos)
    # A delete, or a row deleted after it was written (its D follows in the stream).
    return Change(table, "D", key=body["key"], position=pos)
