"""A synchronous face on nats-py: one asyncio loop in a thread of its own, per connection.

The daemon's services and the ``consume`` command are synchronous; nats-py is asyncio. The
loop runs for the life of the connection (so the client answers server PINGs and reconnects in
the background between our calls); callers submit coroutines and wait with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import nats
import structlog
from nats.js import api

from replicator.config.scale import StreamSection
from replicator.errors import RetryableError

log = structlog.get_logger(__name__, service="stream")

T = TypeVar("T")


class NatsBridge:
    """One NATS connection with JetStream, driven from synchronous code."""

    def __init__(self, cfg: StreamSection, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nats", daemon=True)
        self._thread.start()
        self.nc: Any = None
        self.js: Any = None
        self._last_error: tuple[str, float] = ("", 0.0)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise RetryableError(f"NATS did not answer within {timeout:g} s") from None

    def connect(self) -> None:
        """Connect (once; the client reconnects by itself) and make sure the stream exists."""
        if self.js is not None and not self.nc.is_closed:
            return
        try:
            self.call(self._connect(), self.cfg.timeout + 5)
        except Exception as exc:  # NoServersError, OSError, APIError: the stream is unreachable
            self.close_connection()
            if isinstance(exc, RetryableError):
                raise
            raise RetryableError(f"NATS at {self.cfg.url}: {exc or type(exc).__name__}") from exc

    async def _connect(self) -> None:
        self.nc = await nats.connect(
            servers=self.cfg.servers,
            name=self.name,
            connect_timeout=2,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        js = self.nc.jetstream(timeout=self.cfg.timeout)
        await self._ensure_stream(js)
        self.js = js  # only a connection whose stream exists counts as connected

    # nats-py prints a traceback for every connection error unless told otherwise: one line each.
    # While a server is down the client retries every 0.5 s: the same error once per 30 s.
    async def _on_error(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        now = time.monotonic()
        if text != self._last_error[0] or now - self._last_error[1] >= 30:
            self._last_error = (text, now)
            log.warning("nats_error", error=text)

    async def _on_disconnected(self) -> None:
        log.warning("nats_disconnected", servers=self.cfg.url)

    async def _on_reconnected(self) -> None:
        log.info("nats_reconnected", server=str(getattr(self.nc, "connected_url", "") or ""))

    async def _ensure_stream(self, js: Any) -> None:
        cfg = self.cfg
        try:
            info = await js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                api.StreamConfig(
                    name=cfg.stream,
                    subjects=[f"{cfg.subject_prefix}.>"],
                    retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE,
                    num_replicas=cfg.replicas,
                    max_age=cfg.max_age_days * 86400,
                    duplicate_window=cfg.duplicate_window,
                )
            )
            log.info(
                "stream_created",
                stream=cfg.stream,
                subjects=f"{cfg.subject_prefix}.>",
                replicas=cfg.replicas,
                max_age_days=cfg.max_age_days,
                duplicate_window=cfg.duplicate_window,
            )
            return
        have = info.config.duplicate_window or 0
        if have < cfg.duplicate_window:
            log.warning(
                "stream_duplicate_window_short",
                stream=cfg.stream,
                duplicate_window=have,
                configured=cfg.duplicate_window,
                hint="a change republished after a longer outage may reach the stream twice",
            )

    async def publish_round(
        self, messages: list[tuple[str, bytes, str]], timeout: float
    ) -> tuple[int, int]:
        """Publish to JetStream and wait for every PubAck: (stored, dropped as duplicates).

        The JetStream publish of nats-py waits for (or tracks a future per) each message; a
        round of thousands spends most of its time there. Here every message of the round
        carries a reply subject under one inbox and a single subscription counts the PubAcks,
        so the round costs one publish call per message and one callback per ack.
        """
        nc = self.nc
        inbox = nc.new_inbox()
        done = asyncio.Event()
        counts = {"stored": 0, "dups": 0, "left": len(messages)}
        errors: list[str] = []

        async def on_ack(msg: Any) -> None:
            data = msg.data or b""
            status = (msg.headers or {}).get("Status")
            if status == "503" or not data:
                errors.append("no stream answers on this subject (no responders)")
            elif b'"error"' in data:
                errors.append(json.loads(data)["error"].get("description", data.decode()))
            elif b"duplicate" in data and json.loads(data).get("duplicate"):
                counts["dups"] += 1
            else:
                counts["stored"] += 1
            counts["left"] -= 1
            if counts["left"] <= 0 or errors:
                done.set()

        sub = await nc.subscribe(f"{inbox}.*", cb=on_ack, pending_msgs_limit=len(messages) + 16)
        try:
            for i, (subj, payload, mid) in enumerate(messages):
                await nc.publish(subj, payload, reply=f"{inbox}.{i}", headers={"Nats-Msg-Id": mid})
            await nc.flush(timeout)
            await asyncio.wait_for(done.wait(), timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            raise RetryableError(
                f"JetStream stored {counts['stored'] + counts['dups']} of a round of "
                f"{len(messages)} within {timeout:g} s (cluster without quorum, or NATS "
                "unreachable)"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if errors:
            raise RetryableError(f"JetStream refused a publish: {errors[0]}")
        return counts["stored"], counts["dups"]

    def close_connection(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                fut = asyncio.run_coroutine_threadsafe(nc.close(), self.loop)
                fut.result(5)
            except Exception as exc:  # closing a broken connection: nothing left to do
                log.debug("nats_close_failed", error=str(exc))

    def close(self) -> None:
        self.close_connection()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
