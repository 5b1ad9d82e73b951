"""Correctly signed but hostile webhook bodies never get a 5xx: each one is stored with its raw
bytes and parked as failed with a reason that names the limit and the field — through the real
HTTP server, the real receiver and the real order import, on SQLite and PostgreSQL staging.

The issue's cases (1,000 and 100,000 nested arrays, a 5,001-digit integer, a lone surrogate, NUL)
are listed one by one; a hypothesis-generated set of bodies like them (bounded and derandomized)
follows, and :mod:`replicator.safejson` gets the same set directly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.config.core import HealthSection
from replicator.connectors.webhook import WebhookReceiver
from replicator.orders.coordinator import OrderImportService
from replicator.safejson import JsonRefused, loads
from replicator.web.server import HttpServer, Request, Response
from tests import test_orders_support as support

_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url
service_factory = support.service_factory

SECRET = "whsec-hostile"
MAX_BODY = 1024 * 1024


def _sign(body: bytes) -> str:
    return base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()


class Shop:
    """A webhook shop ``shop`` on a real HttpServer, feeding a real OrderImportService."""

    def __init__(self, svc: OrderImportService) -> None:
        self.svc = svc
        receiver = WebhookReceiver(SECRET, MAX_BODY, svc.store_webhook_delivery, shop="shop")

        def route(req: Request) -> Response:
            status, body = receiver.handle(req.headers, req.body)
            return Response.json(body, status)

        self.health = HttpServer(HealthSection(listen="127.0.0.1:0"), max_body=MAX_BODY)
        self.health.add_route("POST", "/webhooks/shop/shop", route, public=True, max_body=MAX_BODY)
        self.health.start()
        self.url = f"{self.health.url}/webhooks/shop/shop"

    def post(self, body: bytes, **headers: str) -> httpx.Response:
        return httpx.post(
            self.url,
            content=body,
            headers={"X-WC-Webhook-Signature": _sign(body), **headers},
            timeout=30,
        )

    def entry_for(self, raw: bytes) -> Any:
        """The ledger entry holding exactly ``raw`` (after one import cycle ran)."""
        self.svc.run_cycle()
        found = [e for e in self.svc.ledger.list_orders(shop="shop") if e.payload == raw]
        assert len(found) == 1, [e.e_number for e in self.svc.ledger.list_orders(shop="shop")]
        return found[0]


@pytest.fixture
def shop(pg_erp_url: str, service_factory: Any, staging_url: str) -> Iterator[Shop]:
    svc, _ = service_factory(pg_erp_url, staging_url=staging_url)
    s = Shop(svc)
    try:
        yield s
    finally:
        s.health.stop()


HUGE = b"1" + b"0" * 5000

CASES: dict[str, tuple[bytes, str]] = {
    "1000 nested arrays": (b"[" * 1000 + b"]" * 1000, "nested 1000 levels deep (limit 64)"),
    "100k open arrays": (b"[" * 100_000, "nested 100000 levels deep (limit 64)"),
    "5001-digit integer": (
        b'{"number": "9010", "total": ' + HUGE + b"}",
        "field total: a number of 5001 digits (limit 40 characters)",
    ),
    "lone surrogate": (
        b'{"number": "\\ud800", "id": 9011}',
        "field number: invalid Unicode (lone surrogate U+D800)",
    ),
    "NUL in a nested field": (
        b'{"number": "9012", "billing": {"first_name": "A\\u0000B"}}',
        "field billing.first_name: contains a NUL character",
    ),
    "NaN": (b'{"number": "9013", "total": NaN}', "field total: NaN is not a JSON number"),
    "huge exponent": (
        b'{"number": "9014", "total": 1e999999}',
        "field total: the number 1e999999 is out of range",
    ),
    "e-number too long": (
        json.dumps({"number": "7" * 500}).encode(),
        "the e-number in field number is 500 characters long (limit 100",
    ),
    "not UTF-8": (b'{"number": "9015", "name": "M\xfcller"}', "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_signed_hostile_body_is_stored_and_parked_with_the_reason(shop: Shop, case: str) -> None:
    raw, reason = CASES[case]
    r = shop.post(raw, **{"X-WC-Webhook-Delivery-ID": "77"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "stored"
    entry = shop.entry_for(raw)
    assert entry.state == "failed"
    assert reason in (entry.last_error or ""), entry.last_error
    # A replay of the delivery is a duplicate, not a second order and not an error.
    again = shop.post(raw, **{"X-WC-Webhook-Delivery-ID": "77"})
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        ("X-WC-Webhook-Delivery-ID", "12\x003", "X-WC-Webhook-Delivery-ID: contains a control"),
        ("X-WC-Webhook-Delivery-ID", "9" * 200, "X-WC-Webhook-Delivery-ID: longer than 64"),
        ("X-WC-Webhook-Topic", "order.\x01created", "X-WC-Webhook-Topic: contains a control"),
    ],
)
def test_unstorable_headers_are_refused_with_400_naming_them(
    pg_erp_url: str, service_factory: Any, header: str, value: str, message: str
) -> None:
    svc, _ = service_factory(pg_erp_url)
    receiver = WebhookReceiver(SECRET, MAX_BODY, svc.store_webhook_delivery, shop="shop")
    body = b'{"number": "9020"}'
    headers = {"Content-Length": str(len(body)), "X-WC-Webhook-Signature": _sign(body)}
    status, answer = receiver.handle({**headers, header: value}, body)
    assert status == 400 and message in answer["error"]
    assert svc.ledger.list_orders(shop="shop") == []


# -- a generated set like the cases above -------------------------------------------------------

_HOSTILE_SCALARS = st.sampled_from(
    [
        HUGE,
        b"-" + HUGE,
        b"1e999999",
        b"0." + b"1" * 100,
        b"NaN",
        b"-Infinity",
        b'"\\ud800"',
        b'"x\\udfffy"',
        b'"\\u0000"',
        b'"a\\u0000"',
        b'"\xff\xfe"',
        b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 bytes (invalid UTF-8)
        b"[" * 70 + b"]" * 70,
        b"{" * 3,
    ]
)
_PLAIN_SCALARS = st.one_of(
    st.integers(-(10**12), 10**12).map(lambda i: str(i).encode()),
    st.text(max_size=20).map(lambda t: json.dumps(t).encode()),
    st.sampled_from([b"true", b"null", b"12.50"]),
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """A JSON-ish order body with hostile pieces placed in random fields, at random depth."""
    fields: list[bytes] = [b'"number": ' + draw(st.sampled_from([b'"5001"', b"5002", b'""']))]
    for i in range(draw(st.integers(1, 5))):
        value = draw(st.one_of(_HOSTILE_SCALARS, _PLAIN_SCALARS))
        for _ in range(draw(st.integers(0, 3))):
            value = draw(st.sampled_from([b"[%s]", b'{"k": %s}'])) % value
        fields.append(b'"f%d": %s' % (i, value))
    draw(st.randoms()).shuffle(fields)
    return b"{" + b", ".join(fields) + b"}"


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=hostile_bodies())
def test_generated_hostile_bodies_are_stored_never_5xx(shop: Shop, body: bytes) -> None:
    r = shop.post(body)
    assert r.status_code == 200, (r.status_code, r.text, body[:200])
    entry = shop.entry_for(body)
    assert entry.payload == body
    if entry.state == "failed":
        assert entry.last_error


@settings(max_examples=300, derandomize=True, deadline=None)
@given(body=st.one_of(hostile_bodies(), st.binary(max_size=200)))
def test_safejson_refuses_with_a_message_or_returns_storable_values(body: bytes) -> None:
    try:
        value = loads(body, decimal=True)
    except JsonRefused as exc:
        assert str(exc)
        return
    text = json.dumps(value, default=str, ensure_ascii=False)
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogate anywhere
