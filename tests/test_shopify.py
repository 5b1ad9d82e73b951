"""Shopify beyond the shared connector contract: the query-cost bucket, the pinned API version,
per-SKU refusals of ``inventorySetQuantities``, the invoice record, and the webhook receiver —
against the loopback Admin GraphQL emulator."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from replicator.connectors.base import ShopError, ShopUnavailable, StockUpdate
from replicator.connectors.shopify import ShopifyConnector, ShopifyWebhookReceiver
from replicator.connectors.webhook import MemoryWebhookStore
from tests.emulators.orders import generate_orders, generate_products, sample_skus
from tests.emulators.shopify import ShopifyEmulator

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


class Sleeps:
    """Really sleeps (the emulator's bucket refills in real time) and remembers for how long."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


def test_slows_down_before_the_bucket_is_empty() -> None:
    # A bucket of 200 points refilling 100 a second; one page of 2 orders costs 2 + 2 * 75.
    with ShopifyEmulator(bucket_size=200, restore_rate=100, products=[]) as emu:
        emu.add_orders(generate_orders(12, start=T0))
        sleeps = Sleeps()
        c = ShopifyConnector("s", emu.url, emu.access_token, per_page=2, sleep=sleeps)
        got = list(c.fetch_orders(T0 - timedelta(days=1)))
        c.close()
    assert len(got) == 12
    assert emu.throttled == 0  # it waited instead of being refused
    assert sleeps.waits and all(0 < w <= 2 for w in sleeps.waits)


def test_throttled_answer_is_waited_out_for_the_refill_time_not_retried_hot() -> None:
    with ShopifyEmulator(bucket_size=1000, restore_rate=500, products=[]) as emu:
        emu.add_orders(generate_orders(3, start=T0))
        emu._available = 0.0  # another app of the merchant emptied the bucket
        sleeps = Sleeps()
        c = ShopifyConnector("s", emu.url, emu.access_token, per_page=10, sleep=sleeps)
        assert len(list(c.fetch_orders(T0 - timedelta(days=1)))) == 3
        assert emu.throttled >= 1
        # The wait is what the bucket needs for this query's cost (752 points at 500/s).
        assert 1.0 < sum(sleeps.waits) < 3.0
        assert len(sleeps.waits) <= 3

        # A refill longer than the connector may wait: the cycle ends, retry_after says when.
        emu._available = 0.0
        slow = ShopifyConnector("s", emu.url, emu.access_token, per_page=10, max_wait=0.2)
        with pytest.raises(ShopUnavailable) as info:
            list(slow.fetch_orders(T0 - timedelta(days=1)))
        assert info.value.retry_after is not None and info.value.retry_after > 0.2
        c.close()
        slow.close()


def test_query_over_the_single_query_limit_is_a_clear_error() -> None:
    with ShopifyEmulator(max_query_cost=100, products=[]) as emu:
        emu.add_orders(generate_orders(3, start=T0))
        c = ShopifyConnector("s", emu.url, emu.access_token, per_page=10)
        with pytest.raises(ShopError, match="per_page"):
            list(c.fetch_orders(T0 - timedelta(days=1)))
        c.close()


def test_unsupported_api_version_is_reported() -> None:
    with ShopifyEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(2, start=T0))
        c = ShopifyConnector("s", emu.url, emu.access_token, api_version="2023-01")
        with capture_logs() as logs:
            assert len(list(c.fetch_orders(T0 - timedelta(days=1)))) == 2
        c.close()
    warned = [e for e in logs if "another API version" in e["event"]]
    assert warned and warned[0]["pinned"] == "2023-01" and warned[0]["answered"] == "2025-07"


def test_refused_quantities_are_reported_per_sku_and_the_rest_is_written() -> None:
    skus = sample_skus(6)
    with ShopifyEmulator(products=generate_products(skus)) as emu:
        emu.add_variant("NOT-STOCKED", "Gift card", None)  # exists, not stocked at the location
        c = ShopifyConnector("s", emu.url, emu.access_token)
        skipped = c.push_stock(
            [StockUpdate(s, 40 + i) for i, s in enumerate(skus)]
            + [StockUpdate("NOT-STOCKED", 3), StockUpdate("NO-SUCH-SKU", 1)]
        )
        assert sorted(skipped) == ["NO-SUCH-SKU", "NOT-STOCKED"]
        assert {s: emu.stock()[s] for s in skus} == {s: 40 + i for i, s in enumerate(skus)}
        # The mutation is all or nothing: one refused call, one that wrote the rest.
        assert emu.count_operations("inventorySetQuantities") == 2
        c.close()


def test_several_locations_need_location_id() -> None:
    with ShopifyEmulator(locations=2) as emu:
        c = ShopifyConnector("s", emu.url, emu.access_token)
        with pytest.raises(ShopError, match="location_id"):
            c.push_stock([StockUpdate("SKU-00001", 1)])
        c.close()
        c = ShopifyConnector("s", emu.url, emu.access_token, location_id=str(emu.location_ids[0]))
        assert c.push_stock([StockUpdate("SKU-00001", 9)]) == []
        assert emu.stock()["SKU-00001"] == 9
        c.close()


@pytest.mark.parametrize("target", ["metafield", "note"])
def test_invoice_is_recorded_once_where_the_merchant_sees_it(target: str) -> None:
    with ShopifyEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(2, start=T0))
        c = ShopifyConnector(
            "s",
            emu.url,
            emu.access_token,
            invoice_target=target,
            invoice_url="https://erp.example/inv/{filename}",
        )
        c.attach_invoice("#1002", "INV-7.pdf", b"%PDF-1.4 seven")
        c.attach_invoice("#1002", "INV-7.pdf", b"%PDF-1.4 seven")  # a replay
        c.attach_invoice("#1002", "INV-8.pdf", b"%PDF-1.4 eight")  # a second invoice
        text = (
            emu.metafield(1002, "sync_daemon", "erp_invoice")
            if target == "metafield"
            else emu.note(1002)
        )
        c.close()
    assert text is not None
    assert text.count("INV-7.pdf") == 2  # the name, and the name in the link: one record
    assert "https://erp.example/inv/INV-7.pdf" in text and "INV-8.pdf" in text
    assert len(text.splitlines()) == 2


def test_numeric_id_as_e_number() -> None:
    with ShopifyEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(2, start=T0))
        c = ShopifyConnector("s", emu.url, emu.access_token, e_number_field="id")
        got = list(c.fetch_orders(T0 - timedelta(days=1)))
        assert [o.e_number for o in got] == [str(emu.legacy_id(1001)), str(emu.legacy_id(1002))]
        one = c.fetch_order(str(emu.legacy_id(1002)))
        assert one is not None and one.payload["name"] == "#1002"
        c.close()


def test_webhook_verified_deduplicated_and_keyed_by_order_name() -> None:
    with ShopifyEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(1, start=T0))
        store = MemoryWebhookStore()
        rcv = ShopifyWebhookReceiver(emu.client_secret, 100_000, store, shop="s")
        headers, body = emu.webhook_request(1001, webhook_id="wh-1")
        headers["Content-Length"] = str(len(body))
        assert rcv.handle(headers, body) == (200, {"status": "stored", "e_number": "#1001"})
        # Shopify retries with the same X-Shopify-Webhook-Id.
        assert rcv.handle(headers, body)[1]["status"] == "duplicate"
        delivery = store.deliveries[0]
        assert delivery.trusted_e_number and delivery.topic == "orders/create"
        tampered = body.replace(b"#1001", b"#9999")
        assert rcv.handle(headers, tampered)[0] == 401
        unsigned = {k: v for k, v in headers.items() if k != "X-Shopify-Hmac-Sha256"}
        assert rcv.handle(unsigned, body)[0] == 401
        # WooCommerce's header is not Shopify's.
        woo = {**unsigned, "X-WC-Webhook-Signature": headers["X-Shopify-Hmac-Sha256"]}
        assert rcv.handle(woo, body)[0] == 401
        small = ShopifyWebhookReceiver(emu.client_secret, 1024, store, shop="s")
        assert small.handle({**headers, "Content-Length": "5000"}, b"")[0] == 413
        assert len(store.deliveries) == 1


def test_the_emulator_has_the_search_quirks_the_connector_avoids() -> None:
    # 23:30 UTC is 00:30 in Copenhagen: a bound without an offset is read in the shop's zone,
    # and a term Shopify does not understand is ignored (the list comes back unfiltered).
    late = generate_orders(1, start=datetime(2026, 11, 1, 23, 25, tzinfo=UTC))
    early = generate_orders(1, start=datetime(2026, 11, 1, 12, 0, tzinfo=UTC), first_number=2001)
    with ShopifyEmulator(products=[]) as emu:
        emu.add_orders(late + early)
        c = ShopifyConnector("s", emu.url, emu.access_token)

        def names(query: str) -> set[str]:
            data = c.gql(
                "query($q: String!) { orders(first: 10, query: $q) { nodes { name } } }",
                {"q": query},
            )
            return {n["name"] for n in data["orders"]["nodes"]}

        assert names("updated_at:>='2026-11-01T23:00:00Z'") == {"#1001"}
        assert names("updated_at:>='2026-11-02T00:00:00Z'") == set()
        # Midnight without an offset is Copenhagen's midnight, 23:00 UTC: the order is back.
        assert names("updated_at:>='2026-11-02T00:00:00'") == {"#1001"}
        assert names("updatedAt:>='2026-11-01T23:00:00Z'") == {"#1001", "#2001"}  # ignored
        # The connector's window holds regardless: UTC bounds, and its own check on updatedAt.
        got = c.fetch_orders(datetime(2026, 11, 1, 23, 0, tzinfo=UTC))
        assert [o.e_number for o in got] == ["#1001"]
        c.close()


def test_signed_hostile_body_is_kept_raw_for_the_import_to_park() -> None:
    store = MemoryWebhookStore()
    secret = "shpss_hostile"
    rcv = ShopifyWebhookReceiver(secret, 100_000, store, shop="s")
    body = b'{"name": "#1", "x": ' + b"[" * 500 + b"]" * 500 + b"}"
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    headers = {
        "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
        "X-Shopify-Webhook-Id": "wh-hostile",
        "Content-Length": str(len(body)),
    }
    assert rcv.handle(headers, body)[0] == 200
    (d,) = store.deliveries
    assert d.raw == body and d.e_number is None and not d.trusted_e_number
