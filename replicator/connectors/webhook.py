"""The WooCommerce webhook receiver: verify, de-duplicate and hand over order deliveries — fast.

:class:`WebhookReceiver` is framework-free: the daemon's HTTP server (or :func:`serve_webhooks` in
tests) calls :meth:`WebhookReceiver.precheck` with the headers *before* reading the body (so an
oversized body is refused unread), reads it with :func:`read_limited`, then calls
:meth:`WebhookReceiver.handle`.

What a delivery goes through:

1. ``Content-Length`` over ``max_body`` → 413; missing → 411 (WooCommerce always sends it).
2. WooCommerce's ping when a webhook is saved (form body ``webhook_id=N``, unsigned) → 200.
3. ``X-WC-Webhook-Signature`` must be base64(HMAC-SHA256(secret, raw body)), compared in constant
   time → 401 otherwise.
   A delivery id or topic header that the ledger cannot keep (control characters, over 64
   characters) → 400 naming the header.
4. The raw body goes to ``store_callback`` with its de-duplication keys: the delivery id
   (``X-WC-Webhook-Delivery-ID``) and, as a fallback for redeliveries under a new id, the e-number
   plus the SHA-256 of the body. The callback — the order ledger — checks and stores atomically and
   returns False for a duplicate. Nothing else happens in the request: parsing and importing the
   order is the order import's job, so the shop gets its 2xx quickly (WooCommerce disables a webhook
   after repeated slow or failed deliveries).

If the callback raises :class:`~replicator.errors.RetryableError` the answer is 503 (WooCommerce
redelivers later); any other exception is logged and answered 500.

A signed body that is not JSON — or JSON beyond :mod:`replicator.safejson`'s limits: nested too
deep, oversized numbers, NUL or invalid Unicode in a string — is still stored (the ledger keeps the
raw bytes and parks it as failed with the reason) and answered 200, so WooCommerce does not keep
redelivering it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, BinaryIO, Self

import structlog

from replicator import safejson
from replicator.errors import RetryableError

log = structlog.get_logger(__name__)

_PING = re.compile(rb"^webhook_id=\d+$")
# Delivery ids and topics are short tokens ("12345", "order.created").
_MAX_HEADER = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BodyTooLarge(Exception):
    """The body is longer than allowed."""


class BodyTimeout(Exception):
    """The sender did not deliver the whole body in time."""


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One verified delivery, as the ledger stores it."""

    shop: str
    delivery_id: str | None
    topic: str | None
    e_number: str | None
    payload_sha256: str
    raw: bytes
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # True when the receiver read the e-number the platform's own way (Shopify's order name,
    # Shopware's orderNumber): the ledger then takes it as is instead of guessing from the body.
    trusted_e_number: bool = False

    @property
    def dedup_keys(self) -> tuple[str, ...]:
        """Keys a duplicate shares with the original: delivery id, then e-number + body hash."""
        keys = []
        if self.delivery_id:
            keys.append(f"delivery:{self.delivery_id}")
        if self.e_number:
            keys.append(f"order:{self.e_number}:{self.payload_sha256}")
        else:
            keys.append(f"body:{self.payload_sha256}")
        return tuple(keys)


StoreCallback = Callable[[WebhookDelivery], bool]


class MemoryWebhookStore:
    """An in-memory store callback (tests, demos): remembers dedup keys, keeps new deliveries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self.deliveries: list[WebhookDelivery] = []

    def __call__(self, delivery: WebhookDelivery) -> bool:
        with self._lock:
            if any(k in self._keys for k in delivery.dedup_keys):
                return False
            self._keys.update(delivery.dedup_keys)
            self.deliveries.append(delivery)
            return True


def read_limited(
    rfile: BinaryIO | io.BufferedIOBase, content_length: int, max_body: int, timeout: float
) -> bytes:
    """Read exactly ``content_length`` bytes, refusing more than ``max_body`` and taking no longer
    than ``timeout`` seconds in total.

    The socket behind ``rfile`` must have a timeout set (``BaseHTTPRequestHandler.timeout``) so
    one stalled read cannot block for ever; the overall deadline here stops a sender that trickles
    a byte at a time under that per-read timeout. Raises :class:`BodyTooLarge` or
    :class:`BodyTimeout`.
    """
    if content_length > max_body:
        raise BodyTooLarge(f"{content_length} bytes is more than the {max_body} allowed")
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    remaining = content_length
    read1 = getattr(rfile, "read1", None)
    while remaining > 0:
        if time.monotonic() > deadline:
            raise BodyTimeout(
                f"body not complete after {timeout:g}s ({content_length - remaining} bytes)"
            )
        try:
            chunk = read1(min(remaining, 65536)) if read1 else rfile.read(min(remaining, 65536))
        except TimeoutError:
            raise BodyTimeout(
                f"sender stalled ({content_length - remaining} of {content_length} bytes)"
            ) from None
        if not chunk:
            raise BodyTimeout(
                f"connection closed after {content_length - remaining} of {content_length} bytes"
            )
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class WebhookReceiver:
    """Verify and hand over WooCommerce webhook deliveries for one shop.

    Other platforms subclass it (:mod:`replicator.connectors.shopify`,
    :mod:`replicator.connectors.shopware`): their header names, :meth:`expected_signature` and
    :meth:`delivery_for` differ; size limits, verification order and the store contract do not.
    """

    signature_header = "X-WC-Webhook-Signature"
    delivery_header = "X-WC-Webhook-Delivery-ID"
    topic_header = "X-WC-Webhook-Topic"

    def __init__(
        self,
        secret: str | bytes,
        max_body: int,
        store_callback: StoreCallback,
        *,
        shop: str = "webhook",
    ) -> None:
        if not secret:
            raise ValueError("a webhook secret is required")
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self.max_body = max_body
        self.store = store_callback
        self.shop = shop

    @staticmethod
    def _header(headers: Mapping[str, str], name: str) -> str | None:
        lowered = name.lower()
        for k, v in headers.items():
            if k.lower() == lowered:
                return v
        return None

    def precheck(self, headers: Mapping[str, str]) -> tuple[int, dict[str, Any]] | None:
        """An answer to send without reading the body (413/411/400), or None to go on."""
        length = self._header(headers, "Content-Length")
        if length is None:
            return 411, {"error": "Content-Length is required"}
        try:
            n = int(length)
        except ValueError:
            return 400, {"error": "bad Content-Length"}
        if n < 0:
            return 400, {"error": "bad Content-Length"}
        if n > self.max_body:
            log.warning("webhook body too large", shop=self.shop, length=n, max_body=self.max_body)
            return 413, {"error": f"body larger than {self.max_body} bytes"}
        return None

    def expected_signature(self, body: bytes) -> bytes:
        """The signature header the platform sends for ``body`` (WooCommerce: base64 HMAC)."""
        return base64.b64encode(hmac.new(self._secret, body, hashlib.sha256).digest())

    def signature_ok(self, body: bytes, signature: str | None) -> bool:
        if not signature:
            return False
        expected = self.expected_signature(body)
        return hmac.compare_digest(expected, signature.strip().encode("ascii", "replace"))

    def delivery_for(self, headers: Mapping[str, str], body: bytes) -> WebhookDelivery | None:
        """The delivery to store for a verified body; None when it carries no order to import."""
        return WebhookDelivery(
            shop=self.shop,
            delivery_id=self._header(headers, self.delivery_header),
            topic=self._header(headers, self.topic_header),
            e_number=_e_number(body),
            payload_sha256=hashlib.sha256(body).hexdigest(),
            raw=body,
        )

    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Answer one delivery: (HTTP status, JSON body)."""
        early = self.precheck(headers)
        if early is not None:
            return early
        if len(body) > self.max_body:
            return 413, {"error": f"body larger than {self.max_body} bytes"}
        signature = self._header(headers, self.signature_header)
        if signature is None and _PING.match(body.strip()):
            # WooCommerce pings the URL, unsigned, when a webhook is saved; nothing to store.
            log.info("webhook ping", shop=self.shop, body=body.strip().decode("ascii"))
            return 200, {"status": "pong"}
        if not self.signature_ok(body, signature):
            log.warning(
                "webhook signature rejected",
                shop=self.shop,
                reason="missing" if not signature else "mismatch",
                delivery_id=self._header(headers, self.delivery_header),
            )
            return 401, {"error": f"missing or invalid {self.signature_header}"}
        bad_header = _bad_header(headers, (self.delivery_header, self.topic_header))
        if bad_header is not None:
            log.warning("webhook header refused", shop=self.shop, reason=bad_header)
            return 400, {"error": bad_header}
        delivery = self.delivery_for(headers, body)
        if delivery is None:
            log.info(
                "webhook delivery without an order; the next poll covers it",
                shop=self.shop,
                topic=self._header(headers, self.topic_header),
            )
            return 200, {"status": "ignored"}
        try:
            stored = self.store(delivery)
        except RetryableError as exc:
            # Not stored (e.g. the ledger is busy or the import is not running): a 5xx makes
            # WooCommerce deliver again later, so nothing is lost.
            log.warning(
                "webhook delivery not stored; asking for redelivery",
                shop=self.shop,
                delivery_id=delivery.delivery_id,
                error=str(exc),
            )
            return 503, {"error": "temporarily unable to store the delivery; deliver again later"}
        except Exception:
            log.exception(
                "webhook delivery store failed", shop=self.shop, delivery_id=delivery.delivery_id
            )
            return 500, {"error": "the delivery could not be stored"}
        log.info(
            "webhook delivery",
            shop=self.shop,
            delivery_id=delivery.delivery_id,
            topic=delivery.topic,
            e_number=delivery.e_number,
            outcome="stored" if stored else "duplicate",
        )
        return 200, {"status": "stored" if stored else "duplicate", "e_number": delivery.e_number}


def _e_number(body: bytes) -> str | None:
    """The order number of a WooCommerce order payload, if the body is one (a hostile body —
    too deep, huge numbers, invalid Unicode — is not: it is stored and parked by the import)."""
    try:
        data = safejson.loads(body)
    except safejson.JsonRefused:
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("number") or data.get("id")
    return str(value) if value not in (None, "") else None


def _bad_header(
    headers: Mapping[str, str],
    names: tuple[str, ...] = ("X-WC-Webhook-Delivery-ID", "X-WC-Webhook-Topic"),
) -> str | None:
    """Why a stored header (delivery id, topic) cannot be kept, or None: they go into the
    ledger's text columns, which hold neither control characters nor unbounded lengths."""
    for name in names:
        value = WebhookReceiver._header(headers, name)
        if value is None:
            continue
        if len(value) > _MAX_HEADER:
            return f"{name}: longer than {_MAX_HEADER} characters"
        if _CONTROL.search(value):
            return f"{name}: contains a control character"
    return None


class WebhookServer:
    """A small threaded HTTP server in front of one receiver (tests, single-shop setups)."""

    def __init__(
        self,
        host: str,
        port: int,
        receiver: WebhookReceiver,
        *,
        path: str = "/webhook",
        timeout: float = 10.0,
    ) -> None:
        rcv = receiver
        body_timeout = timeout

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Per-read socket timeout, so a stalled sender cannot hold a thread for ever.
            timeout = min(body_timeout, 5.0)  # type: ignore[assignment]

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any], close: bool = False) -> None:
                payload = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] != path:
                    self._reply(404, {"error": "not found"}, close=True)
                    return
                headers = dict(self.headers.items())
                early = rcv.precheck(headers)
                if early is not None:
                    # The body stays unread: close rather than leave it in the stream.
                    self._reply(*early, close=True)
                    return
                try:
                    body = read_limited(
                        self.rfile,
                        int(headers.get("Content-Length", "0")),
                        rcv.max_body,
                        body_timeout,
                    )
                except BodyTimeout as exc:
                    log.warning("webhook body timed out", shop=rcv.shop, detail=str(exc))
                    self._reply(408, {"error": "body not received in time"}, close=True)
                    return
                except BodyTooLarge:
                    self._reply(
                        413, {"error": f"body larger than {rcv.max_body} bytes"}, close=True
                    )
                    return
                self._reply(*rcv.handle(headers, body))

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def start(self) -> Self:
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_webhooks(
    host: str,
    port: int,
    receiver: WebhookReceiver,
    *,
    path: str = "/webhook",
    timeout: float = 10.0,
) -> WebhookServer:
    """Start a threaded HTTP server feeding ``POST path`` to ``receiver``; ``.url``, ``.stop()``."""
    return WebhookServer(host, port, receiver, path=path, timeout=timeout).start()
