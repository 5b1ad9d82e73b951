"""The webshop connector contract (``replicator/connectors/base.py``), one body per behaviour, run
against every API backend's loopback emulator (WooCommerce, Magento, Shopify, Shopware 6).

Assertions are on outcomes: which orders came back, what the emulator's stock/notes now hold, how
many requests it saw.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from replicator import __version__
from replicator.connectors.base import ShopConnector, ShopError, ShopUnavailable, StockUpdate
from replicator.connectors.magento import MagentoConnector
from replicator.connectors.shopify import ShopifyConnector, ShopifyWebhookReceiver
from replicator.connectors.shopware import ShopwareConnector, ShopwareWebhookReceiver
from replicator.connectors.webhook import MemoryWebhookStore, WebhookReceiver
from replicator.connectors.woocommerce import WooCommerceConnector
from tests.emulators import MagentoEmulator, WooCommerceEmulator, generate_orders, generate_products
from tests.emulators.orders import SampleOrder, sample_skus
from tests.emulators.shopify import ShopifyEmulator
from tests.emulators.shopware import ShopwareEmulator

KINDS = ["woocommerce", "magento", "shopify", "shopware"]

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


@dataclass
class Shop:
    """One backend under test: its emulator and how to talk about its orders."""

    kind: str
    emu: Any

    def connector(
        self,
        *,
        per_page: int = 100,
        timeout: float = 5.0,
        secret: str | None = None,
        url: str | None = None,
    ) -> ShopConnector:
        url = url or self.emu.url
        if self.kind == "shopify":
            return ShopifyConnector(
                "shop-s",
                url,
                secret if secret is not None else self.emu.access_token,
                timeout=timeout,
                per_page=per_page,
            )
        if self.kind == "shopware":
            return ShopwareConnector(
                "shop-sw",
                url,
                self.emu.client_id,
                secret if secret is not None else self.emu.client_secret,
                timeout=timeout,
                per_page=per_page,
            )
        if self.kind == "woocommerce":
            return WooCommerceConnector(
                "shop-w",
                url,
                self.emu.consumer_key,
                secret if secret is not None else self.emu.consumer_secret,
                timeout=timeout,
                per_page=per_page,
            )
        return MagentoConnector(
            "shop-m",
            url,
            secret if secret is not None else self.emu.token,
            timeout=timeout,
            per_page=per_page,
        )

    @property
    def secrets(self) -> list[str]:
        if self.kind == "woocommerce":
            return [self.emu.consumer_key, self.emu.consumer_secret]
        if self.kind == "shopify":
            return [self.emu.access_token]
        if self.kind == "shopware":
            return [self.emu.client_id, self.emu.client_secret]
        return [self.emu.token]

    @property
    def credential_word(self) -> str:
        """What a bad-credentials message must name for the operator to know what to fix."""
        return {"woocommerce": "consumer_key", "shopware": "client_secret"}.get(self.kind, "token")

    @property
    def page_size(self) -> int:
        """A page size the shop accepts (Shopify: what ten-line orders fit in one query's cost)."""
        return 10 if self.kind == "shopify" else 20

    def e_number(self, o: SampleOrder) -> str:
        return {
            "woocommerce": str(o.number),
            "shopify": f"#{o.number}",
            "shopware": str(o.number),
        }.get(self.kind, f"{o.number:09d}")

    def modify(self, o: SampleOrder, at: datetime, status: str) -> None:
        if self.kind in ("woocommerce", "shopify"):
            self.emu.modify_order(o.number, at, status=status)
        elif self.kind == "shopware":
            self.emu.modify_order(str(o.number), at, status=status)
        else:
            self.emu.modify_order(self.emu.entity_id(self.e_number(o)), at, status=status)

    def order_list_calls(self) -> int:
        if self.kind == "shopify":
            return int(self.emu.count_operations("orders"))
        if self.kind == "shopware":
            return int(self.emu.count("POST", "/api/search/order"))
        path = "/wp-json/wc/v3/orders" if self.kind == "woocommerce" else "/rest/V1/orders"
        return int(self.emu.count("GET", path))

    def order_page_of(self, req: Any) -> str | None:
        """The page number a request asks for, if it lists orders (offset-paging shops)."""
        if self.kind == "shopware":
            if req.path == "/api/search/order":
                return str((req.json() or {}).get("page"))
            return None
        if self.kind == "shopify":
            return None
        path = "/wp-json/wc/v3/orders" if self.kind == "woocommerce" else "/rest/V1/orders"
        if req.path != path:
            return None
        return req.arg("page") or req.arg("searchCriteria[currentPage]")

    def stock_writes(self) -> int:
        if self.kind == "shopify":
            return int(self.emu.count_operations("inventorySetQuantities"))
        path = {
            "woocommerce": "/wp-json/wc/v3/products/batch",
            "magento": "/rest/V1/inventory/source-items",
            "shopware": "/api/_action/sync",
        }[self.kind]
        return int(self.emu.count("POST", path))

    @property
    def stock_batch(self) -> int:
        return 250 if self.kind == "shopify" else 100

    def invoice_notes(self, o: SampleOrder) -> list[str]:
        if self.kind == "woocommerce":
            return [n["note"] for n in self.emu.notes.get(o.number, [])]
        if self.kind == "shopify":
            value = self.emu.metafield(o.number, "sync_daemon", "erp_invoice")
            return value.splitlines() if value else []
        if self.kind == "shopware":
            return [str(d["fileName"]) for d in self.emu.order_documents(str(o.number))]
        eid = self.emu.entity_id(self.e_number(o))
        return [c["comment"] for c in self.emu.comments.get(eid, [])]


def make_emulator(kind: str, products: list[tuple[str, str, int]]) -> Any:
    return {
        "woocommerce": WooCommerceEmulator,
        "magento": MagentoEmulator,
        "shopify": ShopifyEmulator,
        "shopware": ShopwareEmulator,
    }[kind](products=products)


@pytest.fixture(params=KINDS)
def shop(request: pytest.FixtureRequest) -> Iterator[Shop]:
    products = generate_products(sample_skus(250))
    with make_emulator(request.param, products) as emu:
        yield Shop(request.param, emu)


@pytest.fixture
def conn(shop: Shop) -> Iterator[ShopConnector]:
    c = shop.connector()
    yield c
    c.close()


def _orders_at(*times: datetime, first: int = 5001) -> list[SampleOrder]:
    base = generate_orders(len(times), seed=7, first_number=first)
    return [
        o.__class__(
            **{
                **{f: getattr(o, f) for f in o.__slots__},
                "created": t - timedelta(minutes=5),
                "modified": t,
            }
        )
        for o, t in zip(base, times, strict=True)
    ]


# -- orders --------------------------------------------------------------------------------------
def test_pagination_yields_every_order_exactly_once(shop: Shop) -> None:
    orders = generate_orders(250, seed=3, start=T0, spacing=timedelta(minutes=3))
    shop.emu.add_orders(orders)
    c = shop.connector(per_page=shop.page_size)
    try:
        got = list(c.fetch_orders(T0 - timedelta(days=1), T0 + timedelta(days=2)))
    finally:
        c.close()
    counts = Counter(o.e_number for o in got)
    assert set(counts) == {shop.e_number(o) for o in orders}
    assert max(counts.values()) == 1
    # Shopware: one more search, for orders never updated since checkout (updatedAt null).
    extra = 1 if shop.kind == "shopware" else 0
    assert shop.order_list_calls() == math.ceil(250 / shop.page_size) + extra
    # Ordered by modification time, so the caller can checkpoint on the last one it handled.
    assert [o.updated_at for o in got] == sorted(o.updated_at for o in got)
    assert all(o.raw and o.payload and o.updated_at.tzinfo is not None for o in got)
    assert {r.user_agent for r in shop.emu.requests} == {f"sync-daemon/{__version__}"}


def test_time_window_is_utc_and_half_open(shop: Shop, conn: ShopConnector) -> None:
    # 23:30 UTC is 00:30 the next day in Copenhagen: a connector that sends local-time bounds or
    # forgets dates_are_gmt lands in the wrong day.
    late = datetime(2026, 11, 1, 23, 30, tzinfo=UTC)
    edge = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
    early = datetime(2026, 11, 1, 22, 59, 59, tzinfo=UTC)
    a, b, c = _orders_at(late, edge, early)
    shop.emu.add_orders([a, b, c])
    day1 = {o.e_number for o in conn.fetch_orders(datetime(2026, 11, 1, 23, 0, tzinfo=UTC), edge)}
    assert day1 == {shop.e_number(a)}  # `edge` is excluded, `early` before the window
    day2 = {o.e_number for o in conn.fetch_orders(edge, edge + timedelta(hours=1))}
    assert day2 == {shop.e_number(b)}  # since is inclusive
    open_ended = {o.e_number for o in conn.fetch_orders(late)}
    assert open_ended == {shop.e_number(a), shop.e_number(b)}
    # Aware datetimes in other zones mean the same instant.
    cph = late.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Copenhagen"))
    assert {o.e_number for o in conn.fetch_orders(cph, edge)} == {shop.e_number(a)}


def test_modified_order_reappears_in_later_window_with_new_content(
    shop: Shop, conn: ShopConnector
) -> None:
    orders = generate_orders(10, seed=5, start=T0)
    shop.emu.add_orders(orders)
    later = T0 + timedelta(days=3)
    shop.modify(orders[4], later, status="cancelled")
    got = list(conn.fetch_orders(later - timedelta(minutes=1), later + timedelta(minutes=1)))
    assert [o.e_number for o in got] == [shop.e_number(orders[4])]
    assert got[0].status == "cancelled"
    assert got[0].updated_at == later
    before = {o.e_number for o in conn.fetch_orders(T0 - timedelta(days=1), T0 + timedelta(days=1))}
    assert shop.e_number(orders[4]) not in before and len(before) == 9


def test_fetch_order_by_e_number(shop: Shop, conn: ShopConnector) -> None:
    orders = generate_orders(3, seed=2, start=T0)
    shop.emu.add_orders(orders)
    got = conn.fetch_order(shop.e_number(orders[1]))
    assert got is not None and got.e_number == shop.e_number(orders[1])
    key = {"magento": "customer_email", "shopify": "billingAddress", "shopware": "orderCustomer"}
    assert got.payload[key.get(shop.kind, "billing")] is not None
    assert conn.fetch_order("999999") is None
    assert conn.fetch_order("#999999" if shop.kind == "shopify" else "999999") is None


def test_magento_past_the_end_quirk_does_not_loop_or_duplicate() -> None:
    with MagentoEmulator() as emu:
        orders = generate_orders(45, seed=9, start=T0)
        emu.add_orders(orders)
        # The emulator really has the quirk: page 99 of 3 is page 3 again.
        c = MagentoConnector("m", emu.url, emu.token, per_page=20)
        import httpx

        r = httpx.get(
            emu.url + "/rest/V1/orders",
            params={"searchCriteria[pageSize]": "20", "searchCriteria[currentPage]": "99"},
            headers={"Authorization": f"Bearer {emu.token}"},
        ).json()
        assert len(r["items"]) == 5 and r["total_count"] == 45
        # total_count over-counted (as some Magento versions do): paging must still end, once each.
        emu.total_count_bias = 1000
        got = [o.e_number for o in c.fetch_orders(T0 - timedelta(days=1))]
        assert sorted(got) == sorted(f"{o.number:09d}" for o in orders)
        # Pages 1-3 plus one repeat of page 3 that proves the end was reached.
        assert emu.count("GET", "/rest/V1/orders") == 1 + 4
        c.close()


# -- failures ------------------------------------------------------------------------------------
def test_bad_credentials_give_shop_error_without_the_secret(shop: Shop) -> None:
    wrong = "WRONG-s3cr3t-value-1234"
    c = shop.connector(secret=wrong)
    try:
        with pytest.raises(ShopError) as info:
            list(c.fetch_orders(T0))
    finally:
        c.close()
    msg = str(info.value)
    assert "401" in msg and c.name in msg
    assert shop.credential_word in msg
    for secret in [wrong, *shop.secrets]:
        assert secret not in msg
    assert not isinstance(info.value, ShopUnavailable)


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ("fail", "HTTP 500"),
        ("throttle", "429"),
        ("truncate", "cut"),
        ("garbage", "not JSON"),
        ("delay", "timed out"),
    ],
)
def test_transient_faults_give_shop_unavailable(shop: Shop, fault: str, expect: str) -> None:
    shop.emu.add_orders(generate_orders(5, seed=1, start=T0))
    c = shop.connector(timeout=0.3)
    try:
        {
            "fail": lambda: shop.emu.fail_next(1, 500),
            "throttle": lambda: shop.emu.throttle_next(1, retry_after=17),
            "truncate": lambda: shop.emu.truncate_next(1),
            "garbage": lambda: shop.emu.garbage_next(1),
            "delay": lambda: shop.emu.delay_next(1, 1.5),
        }[fault]()
        with pytest.raises(ShopUnavailable) as info:
            list(c.fetch_orders(T0 - timedelta(days=1)))
        assert expect in str(info.value)
        assert info.value.retry_after == (17 if fault == "throttle" else None)
        for secret in shop.secrets:
            assert secret not in str(info.value)
        # The fault was one request: the next poll gets everything.
        assert len(list(c.fetch_orders(T0 - timedelta(days=1)))) == 5
    finally:
        c.close()


def test_shop_down_gives_shop_unavailable(shop: Shop) -> None:
    c = shop.connector(timeout=1)
    shop.emu.stop()
    try:
        with pytest.raises(ShopUnavailable, match="cannot reach"):
            list(c.fetch_orders(T0))
    finally:
        c.close()


# -- stock ---------------------------------------------------------------------------------------
def test_push_stock_in_batches_and_fetch_stock_reads_it_back(
    shop: Shop, conn: ShopConnector
) -> None:
    skus = sample_skus(250)
    updates = [StockUpdate(sku, 1000 + i) for i, sku in enumerate(skus)]
    conn.push_stock(updates)
    assert shop.emu.stock() == {u.sku: u.quantity for u in updates}
    assert shop.stock_writes() == math.ceil(250 / shop.stock_batch)  # e.g. 100 + 100 + 50
    listed = {u.sku: u.quantity for u in conn.fetch_stock()}
    assert listed == {u.sku: u.quantity for u in updates}

    shop.emu.reset_log()
    conn.push_stock([StockUpdate("SKU-00007", 0), StockUpdate("SKU-00008", 3)])
    assert shop.emu.stock()["SKU-00007"] == 0 and shop.emu.stock()["SKU-00008"] == 3
    # One write, and no product lookups: the SKU → id map (and the token) is cached.
    assert shop.emu.count() == 1 and shop.stock_writes() == 1


def test_push_stock_unknown_sku_does_not_block_the_others(shop: Shop, conn: ShopConnector) -> None:
    skipped = conn.push_stock(
        [StockUpdate("SKU-00001", 11), StockUpdate("NOT-IN-SHOP", 5), StockUpdate("SKU-00002", 12)]
    )
    assert skipped == ["NOT-IN-SHOP"]
    stock = shop.emu.stock()
    assert stock["SKU-00001"] == 11 and stock["SKU-00002"] == 12 and "NOT-IN-SHOP" not in stock


# -- invoices ------------------------------------------------------------------------------------
def test_attach_invoice_lands_on_the_order(shop: Shop, conn: ShopConnector) -> None:
    orders = generate_orders(2, seed=4, start=T0)
    shop.emu.add_orders(orders)
    conn.attach_invoice(shop.e_number(orders[1]), "INV-2026-0042.pdf", b"%PDF-1.4 fake")
    notes = shop.invoice_notes(orders[1])
    assert len(notes) == 1 and "INV-2026-0042.pdf" in notes[0]
    assert shop.invoice_notes(orders[0]) == []
    with pytest.raises(ShopError, match="not found"):
        conn.attach_invoice("424242", "x.pdf", b"%PDF")


def test_order_modified_while_paging_does_not_hide_another(shop: Shop) -> None:
    orders = generate_orders(60, seed=12, start=T0, spacing=timedelta(minutes=1))
    shop.emu.add_orders(orders)
    until = T0 + timedelta(hours=3)
    done: list[int] = []

    def modify_during_page_2(req: Any) -> None:
        page = shop.order_page_of(req)
        if shop.kind == "shopify" and "graphql" in req.path and b"orders(" in req.body:
            page = "2" if b'"after": "' in req.body or b'"after":"' in req.body else "1"
        if page == "2" and not done:
            done.append(1)
            # Order 3 (on page 1, already read) moves past `until`: every later order shifts
            # one place towards the front, and the first of page 2 slides onto page 1.
            shop.modify(orders[2], until + timedelta(minutes=5), status="cancelled")

    shop.emu.before_route = modify_during_page_2
    c = shop.connector(per_page=shop.page_size)
    try:
        got = [o.e_number for o in c.fetch_orders(T0 - timedelta(hours=1), until)]
    finally:
        c.close()
    assert done
    assert sorted(got) == sorted(shop.e_number(o) for o in orders)
    assert len(got) == len(set(got))


def test_wrong_url_gives_shop_error_about_the_url(shop: Shop) -> None:
    c = shop.connector(url=shop.emu.url + "/shop")
    try:
        with pytest.raises(ShopError, match="404") as info:
            list(c.fetch_orders(T0))
    finally:
        c.close()
    assert "/shop" in str(info.value) and "url" in str(info.value)
    assert not isinstance(info.value, ShopUnavailable)


def test_outage_in_the_middle_of_paging_loses_nothing(shop: Shop) -> None:
    orders = generate_orders(45, seed=21, start=T0, spacing=timedelta(minutes=2))
    shop.emu.add_orders(orders)
    c = shop.connector(per_page=shop.page_size)
    try:
        it = c.fetch_orders(T0 - timedelta(hours=1), T0 + timedelta(days=1))
        first = next(it)  # the first page is in
        shop.emu.fail_next(1, 503)  # the shop goes down before the next page
        with pytest.raises(ShopUnavailable, match="503"):
            list(it)
        # The caller keeps its watermark; the next poll of the same window gets every order.
        again = [
            o.e_number for o in c.fetch_orders(T0 - timedelta(hours=1), T0 + timedelta(days=1))
        ]
    finally:
        c.close()
    assert first.e_number == shop.e_number(orders[0])
    assert sorted(again) == sorted(shop.e_number(o) for o in orders)
    assert len(again) == len(set(again))


# -- webhooks ------------------------------------------------------------------------------------
def _signed_delivery(shop: Shop, o: SampleOrder) -> tuple[Any, dict[str, str], bytes]:
    """(receiver over a memory store, headers, body) of a signed order delivery of ``shop``."""
    store = MemoryWebhookStore()
    if shop.kind == "shopify":
        rcv: WebhookReceiver = ShopifyWebhookReceiver(shop.emu.client_secret, 200_000, store)
        headers, body = shop.emu.webhook_request(o.number)
    elif shop.kind == "shopware":
        rcv = ShopwareWebhookReceiver(shop.emu.shop_secret, 200_000, store)
        headers, body = shop.emu.webhook_request(str(o.number))
    else:
        secret = "woo-hook-secret"
        rcv = WebhookReceiver(secret, 200_000, store)
        body = json.dumps(shop.emu.orders[o.number]).encode()
        digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
        headers = {
            "X-WC-Webhook-Signature": base64.b64encode(digest).decode(),
            "X-WC-Webhook-Delivery-ID": "d-1",
            "X-WC-Webhook-Topic": "order.updated",
        }
    headers["Content-Length"] = str(len(body))
    return (rcv, store), headers, body


@pytest.mark.parametrize("kind", ["woocommerce", "shopify", "shopware"])
def test_webhook_delivery_has_the_polls_e_number_once_and_only_signed(kind: str) -> None:
    with make_emulator(kind, generate_products(sample_skus(20))) as emu:
        shop = Shop(kind, emu)
        orders = generate_orders(2, seed=6, start=T0)
        emu.add_orders(orders)
        (rcv, store), headers, body = _signed_delivery(shop, orders[1])
        assert rcv.handle(headers, body)[0] == 200
        assert rcv.handle(headers, body)[1]["status"] == "duplicate"  # redelivered
        c = shop.connector()
        polled = c.fetch_order(shop.e_number(orders[1]))
        c.close()
        # The webhook and the poll name the order alike: one ledger row, one ERP order.
        assert polled is not None and store.deliveries[0].e_number == polled.e_number
        assert len(store.deliveries) == 1
        sig = rcv.signature_header
        assert rcv.handle({**headers, sig: headers[sig][::-1]}, body)[0] == 401
        assert rcv.handle({k: v for k, v in headers.items() if k != sig}, body)[0] == 401
        assert rcv.handle({**headers, "Content-Length": "300000"}, b"")[0] == 413
        assert len(store.deliveries) == 1
