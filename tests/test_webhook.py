"""The WooCommerce webhook receiver over real loopback HTTP: signatures, de-duplication, size and
time limits. Assertions are on what the store received and what the sender was answered."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from replicator.connectors.webhook import (
    MemoryWebhookStore,
    WebhookDelivery,
    WebhookReceiver,
    WebhookServer,
    serve_webhooks,
)

SECRET = "whsec-loopback-7c1d2e"


def sign(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def order_body(number: int = 1234, status: str = "processing") -> bytes:
    return json.dumps(
        {"id": number, "number": str(number), "status": status, "total": "99.00"}
    ).encode()


def headers(
    body: bytes, delivery: str | None = "d-1", signature: str | None = "auto"
) -> dict[str, str]:
    h = {"Content-Type": "application/json", "X-WC-Webhook-Topic": "order.created"}
    if delivery:
        h["X-WC-Webhook-Delivery-ID"] = delivery
    if signature == "auto":
        h["X-WC-Webhook-Signature"] = sign(body)
    elif signature is not None:
        h["X-WC-Webhook-Signature"] = signature
    return h


@pytest.fixture
def store() -> MemoryWebhookStore:
    return MemoryWebhookStore()


@pytest.fixture
def server(store: MemoryWebhookStore) -> Iterator[WebhookServer]:
    receiver = WebhookReceiver(SECRET, 64 * 1024, store, shop="webshop")
    srv = serve_webhooks("127.0.0.1", 0, receiver, timeout=0.8)
    yield srv
    srv.stop()


def post(server: WebhookServer, body: bytes, hdrs: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + "/webhook", content=body, headers=hdrs, timeout=5)


def test_signed_delivery_is_stored_once_even_if_delivered_three_times(
    server: WebhookServer, store: MemoryWebhookStore
) -> None:
    body = order_body(1234)
    answers = [post(server, body, headers(body, delivery="d-77")) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["status"] for a in answers] == ["stored", "duplicate", "duplicate"]
    assert len(store.deliveries) == 1
    d = store.deliveries[0]
    assert d.raw == body and d.e_number == "1234" and d.delivery_id == "d-77"
    assert d.topic == "order.created" and d.shop == "webshop"


def test_redelivery_under_new_id_is_caught_by_e_number_and_hash(
    server: WebhookServer, store: MemoryWebhookStore
) -> None:
    body = order_body(55)
    assert post(server, body, headers(body, delivery="a")).json()["status"] == "stored"
    assert post(server, body, headers(body, delivery="b")).json()["status"] == "duplicate"
    changed = order_body(55, status="completed")  # a real update of the same order is new
    assert post(server, changed, headers(changed, delivery="c")).json()["status"] == "stored"
    assert [json.loads(d.raw)["status"] for d in store.deliveries] == ["processing", "completed"]


@pytest.mark.parametrize("signature", [None, "", "bm90IHRoZSByaWdodCBvbmU=", sign(b"other body")])
def test_missing_or_bad_signature_is_401_and_not_stored(
    server: WebhookServer, store: MemoryWebhookStore, signature: str | None
) -> None:
    body = order_body()
    r = post(server, body, headers(body, signature=signature))
    assert r.status_code == 401
    assert SECRET not in r.text
    assert store.deliveries == []


def test_wrong_secret_is_401(server: WebhookServer, store: MemoryWebhookStore) -> None:
    body = order_body()
    r = post(server, body, headers(body, signature=sign(body, "another-secret")))
    assert r.status_code == 401 and store.deliveries == []


def test_ping_is_answered_200_without_storing(
    server: WebhookServer, store: MemoryWebhookStore
) -> None:
    r = post(server, b"webhook_id=12", {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json() == {"status": "pong"}
    assert store.deliveries == []


def test_signed_non_json_is_kept_raw(server: WebhookServer, store: MemoryWebhookStore) -> None:
    body = b"\xff\xfe not json"
    r = post(server, body, headers(body, delivery="x"))
    assert r.status_code == 200
    assert len(store.deliveries) == 1 and store.deliveries[0].raw == body
    assert store.deliveries[0].e_number is None


def _raw_request(server: WebhookServer, head: bytes, body: bytes = b"", wait: float = 3.0) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head + body)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_oversized_body_is_413_before_reading_it(
    server: WebhookServer, store: MemoryWebhookStore
) -> None:
    # Only the headers are sent: the answer must come without the server waiting for 10 MB.
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-WC-Webhook-Signature: abc\r\nContent-Length: 10000000\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 413")
    assert time.monotonic() - started < 2
    assert store.deliveries == []


def test_missing_content_length_is_411(server: WebhookServer) -> None:
    answer = _raw_request(server, b"POST /webhook HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411")


def test_partial_body_times_out_without_hanging_the_server(
    server: WebhookServer, store: MemoryWebhookStore
) -> None:
    body = order_body(9)
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"X-WC-Webhook-Signature: {sign(body)}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    result: dict[str, bytes] = {}
    # A sender that stops halfway through the body, and keeps the connection open.
    slow = threading.Thread(
        target=lambda: result.update(a=_raw_request(server, head, body[:10], wait=5))
    )
    slow.start()
    time.sleep(0.1)
    # Meanwhile the server keeps serving others.
    good = order_body(10)
    started = time.monotonic()
    assert post(server, good, headers(good, delivery="g")).status_code == 200
    assert time.monotonic() - started < 0.5
    slow.join(timeout=5)
    assert result["a"].startswith(b"HTTP/1.1 408")
    assert [d.e_number for d in store.deliveries] == ["10"]


def test_trickling_sender_hits_the_overall_deadline(
    server: WebhookServer, store: MemoryWebhookStore
) -> None:
    body = order_body(11)
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\n"
        + f"X-WC-Webhook-Signature: {sign(body)}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head)
        answer = b""
        for byte in body:  # one byte every 0.1 s: under the per-read timeout, over the deadline
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.1)
            try:
                answer = s.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
    assert answer.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 3
    assert store.deliveries == []


def test_handle_directly_without_http(store: MemoryWebhookStore) -> None:
    receiver = WebhookReceiver(SECRET, 1000, store)
    body = order_body(3)
    status, answer = receiver.handle({**headers(body), "content-length": str(len(body))}, body)
    assert (status, answer["status"]) == (200, "stored")
    big = b"x" * 1001
    assert receiver.handle({"Content-Length": "1001"}, big)[0] == 413
    assert len(store.deliveries) == 1


def test_store_that_cannot_take_the_delivery_gets_it_again_later() -> None:
    from replicator.errors import RetryableError

    store = MemoryWebhookStore()
    down = [True]

    def flaky(delivery: WebhookDelivery) -> bool:
        if down[0]:
            raise RetryableError("order import is not running")
        return store(delivery)

    with serve_webhooks("127.0.0.1", 0, WebhookReceiver(SECRET, 4096, flaky)) as srv:
        body = order_body(77)
        r = post(srv, body, headers(body, delivery="r-1"))
        assert r.status_code == 503 and store.deliveries == []
        down[0] = False
        r = post(srv, body, headers(body, delivery="r-1"))  # WooCommerce's redelivery
        assert r.status_code == 200 and [d.e_number for d in store.deliveries] == ["77"]
