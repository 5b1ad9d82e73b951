"""Stock push against the loopback WooCommerce and Magento emulators: the shop's final stock equals
the ERP's after bursts, outages, 429s, with coalescing on and off; only changed SKUs are sent;
exclusions hold; the full reconcile corrects drift; the rate limit holds.

Changes enter the staging store through its real apply path (mirror + journal); the end-to-end
path from an ERP commit through logical replication is covered in ``test_push_e2e.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from replicator.changes import Change, Column, TableSchema
from replicator.config import Config, parse_config
from replicator.connectors.base import ShopConnector, StockUpdate
from replicator.connectors.magento import MagentoConnector
from replicator.connectors.shopify import ShopifyConnector
from replicator.connectors.shopware import ShopwareConnector
from replicator.connectors.woocommerce import WooCommerceConnector
from replicator.push.ratelimit import TokenBucket
from replicator.push.stock import StockPushService
from replicator.staging import StagingStore
from tests.emulators import MagentoEmulator, WooCommerceEmulator
from tests.emulators.base import Request as EmuRequest
from tests.emulators.shopify import ShopifyEmulator
from tests.emulators.shopware import ShopwareEmulator

STOCK = TableSchema(
    "public",
    "stock",
    (
        Column("sku", "text"),
        Column("warehouse", "integer"),
        Column("qty", "integer"),
        Column("reserved", "integer"),
    ),
    ("sku", "warehouse"),
)
SKUS = [f"SKU-{i:03d}" for i in range(1, 21)] + ["GIFT-1"]


class Shop:
    """An emulator, a connector to it, and a log of the stock each push request carried."""

    def __init__(self, kind: str) -> None:
        products = [(s, f"Product {s}", 0) for s in SKUS]
        self.kind = kind
        self.emu: Any = {
            "woocommerce": WooCommerceEmulator,
            "magento": MagentoEmulator,
            "shopify": ShopifyEmulator,
            "shopware": ShopwareEmulator,
        }[kind](products=products)
        self.emu.start()
        self.pushes: list[dict[str, int]] = []  # one dict per accepted-or-not push request
        self.emu.before_route = self._capture
        self.connector: ShopConnector
        if kind == "shopify":
            self.connector = ShopifyConnector("web", self.emu.url, self.emu.access_token, timeout=5)
        elif kind == "shopware":
            self.connector = ShopwareConnector(
                "web", self.emu.url, self.emu.client_id, self.emu.client_secret, timeout=5
            )
        elif kind == "woocommerce":
            emu = self.emu
            assert isinstance(emu, WooCommerceEmulator)
            self.connector = WooCommerceConnector(
                "web", emu.url, emu.consumer_key, emu.consumer_secret, timeout=5
            )
            self._ids = {p["id"]: p["sku"] for p in emu.products.values()}
        else:
            assert isinstance(self.emu, MagentoEmulator)
            self.connector = MagentoConnector("web", self.emu.url, self.emu.token, timeout=5)

    def _is_push(self, path: str, body: bytes) -> bool:
        if self.kind == "shopify":
            return path.endswith("/graphql.json") and b"inventorySetQuantities" in body
        if self.kind == "shopware":
            return path == "/api/_action/sync"
        return path.endswith("/products/batch") or path.endswith("/inventory/source-items")

    def _capture(self, req: EmuRequest) -> None:
        body = req.json() if req.method == "POST" else None
        if not body or not self._is_push(req.path, req.body):
            return
        if self.kind == "shopify":
            by_item = {
                f"gid://shopify/InventoryItem/{v['inventory_item_id']}": k
                for k, v in self.emu.variants.items()
            }
            qs = body["variables"]["input"]["quantities"]
            self.pushes.append({by_item[q["inventoryItemId"]]: q["quantity"] for q in qs})
        elif self.kind == "shopware":
            by_id = {pid: p["productNumber"] for pid, p in self.emu.products.items()}
            self.pushes.append({by_id[i["id"]]: i["stock"] for i in body[0]["payload"]})
        elif req.path.endswith("/products/batch"):
            self.pushes.append(
                {self._ids[int(i["id"])]: i["stock_quantity"] for i in body.get("update", [])}
            )
        elif req.path.endswith("/inventory/source-items"):
            self.pushes.append({i["sku"]: i["quantity"] for i in body["sourceItems"]})

    def stock(self) -> dict[str, int]:
        return {k: int(v or 0) for k, v in self.emu.stock().items()}

    def push_requests(self) -> int:
        if self.kind == "shopify":
            return int(self.emu.count_operations("inventorySetQuantities"))
        if self.kind == "shopware":
            return int(self.emu.count("POST", "/api/_action/sync"))
        path = "/wp-json/wc/v3/products/batch" if self.kind == "woocommerce" else "/rest"
        return sum(
            1
            for r in self.emu.requests
            if r.method == "POST" and r.path.startswith(path) and "comments" not in r.path
        )

    def close(self) -> None:
        self.connector.close()
        self.emu.stop()


@pytest.fixture(params=["woocommerce", "magento", "shopify", "shopware"])
def shop(request: pytest.FixtureRequest) -> Iterator[Shop]:
    s = Shop(request.param)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StagingStore]:
    st = StagingStore(f"sqlite:///{tmp_path / 'staging.db'}")
    st.setup()
    st.ensure_mirror(STOCK)
    try:
        yield st
    finally:
        st.dispose()


@pytest.fixture
def any_store(staging_url: str) -> Iterator[StagingStore]:
    """Staging on SQLite and on PostgreSQL (the conftest's ``staging_url``)."""
    st = StagingStore(staging_url)
    st.setup()
    st.ensure_mirror(STOCK)
    try:
        yield st
    finally:
        st.dispose()


def config(**push: Any) -> Config:
    return parse_config(
        {
            "erp": {"dsn": "postgresql://erp@127.0.0.1:1/erp"},
            "capture": {"tables": ["public.stock"]},
            "stock_push": {
                "tables": ["stock"],
                "on_hand_column": "qty",
                "reserved_column": "reserved",
                "warehouse_column": "warehouse",
                "coalesce_seconds": 0,
                "rate_limit": 1000,
                "burst": 1000,
                **push,
            },
        }
    )


class Erp:
    """The ERP's stock as the test changes it, written to staging through the apply path."""

    def __init__(self, store: StagingStore) -> None:
        self.store = store
        self.rows: dict[tuple[str, int], tuple[int, int]] = {}
        self.pos = 0

    def set(self, changes: Sequence[tuple[str, int, int | None, int]]) -> None:
        """(sku, warehouse, qty or None to delete, reserved), committed as one transaction."""
        txn = self.store.begin("erp")
        for sku, wh, qty, res in changes:
            self.pos += 1
            if qty is None:
                self.rows.pop((sku, wh), None)
                txn.apply(
                    Change(
                        "public.stock",
                        "D",
                        key={"sku": sku, "warehouse": wh},
                        position=str(self.pos),
                    )
                )
            else:
                self.rows[(sku, wh)] = (qty, res)
                txn.apply(
                    Change(
                        "public.stock",
                        "U",
                        values={"sku": sku, "warehouse": wh, "qty": qty, "reserved": res},
                        position=str(self.pos),
                    )
                )
        txn.commit(None)

    def expected(self, exclude: tuple[str, ...] = (), buffer: int = 0) -> dict[str, int]:
        out: dict[str, int] = {}
        for (sku, _), (q, r) in self.rows.items():
            out[sku] = out.get(sku, 0) + q - r
        return {s: max(0, q - buffer) for s, q in out.items() if s not in exclude}


def shop_has(shop: Shop, expected: dict[str, int]) -> bool:
    have = shop.stock()
    return all(have.get(s) == q for s, q in expected.items())


def journal_max(store: StagingStore) -> int:
    with store.engine.connect() as c:
        return int(c.exec_driver_sql("SELECT MAX(id) FROM sync_journal").scalar() or 0)


def test_burst_without_coalescing_and_only_changed_skus(
    shop: Shop, any_store: StagingStore
) -> None:
    store = any_store
    erp = Erp(store)
    svc = StockPushService(config(), store, [shop.connector])
    erp.set([(s, w, 10 * w, 1) for s in SKUS[:10] for w in (1, 2)])
    for i in range(30):  # a burst: many changes of a few SKUs
        erp.set([(SKUS[i % 5], 1, 100 + i, 0)])
    svc.run_cycle()
    assert shop_has(shop, erp.expected())
    # 10 SKUs, one request (the batch endpoint), every SKU once with its latest value.
    assert shop.push_requests() == 1 and len(shop.pushes[-1]) == 10
    assert svc.reader.committed == journal_max(store)

    # Moving stock between warehouses changes no published quantity: no request at all.
    erp.set([(SKUS[7], 1, 5, 1), (SKUS[7], 2, 25, 1)])
    svc.run_cycle()
    assert shop.push_requests() == 1
    # One SKU changes: one request carrying that SKU only.
    erp.set([(SKUS[8], 2, 1, 0)])
    svc.run_cycle()
    assert shop.push_requests() == 2 and shop.pushes[-1] == {SKUS[8]: 9 + 1}
    # A deleted warehouse row lowers the sum.
    erp.set([(SKUS[8], 1, None, 0)])
    svc.run_cycle()
    assert shop.pushes[-1] == {SKUS[8]: 1}
    assert shop_has(shop, erp.expected())
    svc.close()


def test_coalescing_window(shop: Shop, store: StagingStore) -> None:
    now = [1000.0]
    erp = Erp(store)
    svc = StockPushService(
        config(coalesce_seconds=60), store, [shop.connector], clock=lambda: now[0]
    )
    erp.set([(SKUS[0], 1, 5, 0)])
    svc.run_cycle()
    for q in (6, 7, 8, 9):
        now[0] += 10
        erp.set([(SKUS[0], 1, q, 0)])
        svc.run_cycle()
    assert shop.push_requests() == 0, "inside the window nothing is pushed"
    assert svc.reader.committed == 0, "the cursor waits for the push"
    now[0] += 20.5
    svc.run_cycle()
    assert shop.push_requests() == 1 and shop.pushes == [{SKUS[0]: 9}]
    assert svc.reader.committed == journal_max(store)
    assert shop.stock()[SKUS[0]] == 9


def test_shop_outage_nothing_lost_no_storm(shop: Shop, any_store: StagingStore) -> None:
    store = any_store
    now = [0.0]
    erp = Erp(store)
    svc = StockPushService(config(max_backoff=300), store, [shop.connector], clock=lambda: now[0])
    erp.set([(s, 1, 3, 0) for s in SKUS])
    svc.run_cycle()
    assert shop_has(shop, erp.expected())
    shop.emu.fail_next(10_000, status=500)  # the shop is down "for an hour"
    start_cursor = svc.reader.committed
    for minute in range(60):
        now[0] += 60
        erp.set([(SKUS[minute % 12], 1, minute, 0), (SKUS[(minute * 7) % 12], 2, 1, 0)])
        svc.run_cycle()
    assert svc.reader.committed == start_cursor, "nothing accepted, so the cursor stays"
    failed_requests = shop.push_requests()
    assert failed_requests < 25  # back-off: not one request per change

    # A restart while the shop is down loses nothing: the dirty set is rebuilt from the cursor.
    svc.close()
    svc = StockPushService(config(max_backoff=300), store, [shop.connector], clock=lambda: now[0])
    shop.emu.clear_faults()
    now[0] += 1
    before = len(shop.pushes)
    svc.run_cycle()
    assert shop_has(shop, erp.expected())
    new = shop.pushes[before:]
    assert len(new) == 1, "one batch with the latest values, no storm of stale ones"
    assert len(new[0]) == 12 and new[0] == {s: erp.expected()[s] for s in new[0]}
    assert svc.reader.committed == journal_max(store)


def test_429_retry_after_is_honoured(shop: Shop, store: StagingStore) -> None:
    erp = Erp(store)
    svc = StockPushService(config(), store, [shop.connector])
    erp.set([(s, 1, 7, 2) for s in SKUS[:5]])
    shop.emu.throttle_next(1, retry_after=1)
    t0 = time.monotonic()
    svc.run_cycle()
    assert not shop_has(shop, erp.expected())
    calls_after_429 = len(shop.emu.requests)
    svc.run_cycle()  # still inside Retry-After: the shop is left alone
    assert len(shop.emu.requests) == calls_after_429
    while not shop_has(shop, erp.expected()) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
        svc.run_cycle()
    assert shop_has(shop, erp.expected())
    assert time.monotonic() - t0 >= 1.0
    statuses = [r.status for r in shop.emu.requests]
    assert statuses.count(429) == 1
    assert svc.reader.committed == journal_max(store)


def test_exclusions_buffer_and_warehouses(shop: Shop, store: StagingStore) -> None:
    erp = Erp(store)
    cfg = config(exclude_skus=["GIFT-*", SKUS[1]], safety_buffer=2, warehouses=["1"])
    svc = StockPushService(cfg, store, [shop.connector])
    erp.set([(s, 1, 10, 3) for s in SKUS] + [(s, 2, 50, 0) for s in SKUS])  # warehouse 2 ignored
    svc.run_cycle()
    have = shop.stock()
    assert have["GIFT-1"] == 0 and have[SKUS[1]] == 0  # untouched
    assert all(have[s] == 10 - 3 - 2 for s in SKUS if s not in ("GIFT-1", SKUS[1]))
    assert all("GIFT-1" not in p and SKUS[1] not in p for p in shop.pushes)
    erp.set([(SKUS[2], 1, 1, 0)])  # 1 - buffer 2: never below 0
    svc.run_cycle()
    assert shop.stock()[SKUS[2]] == 0


def test_reconcile_corrects_drift_and_reports(shop: Shop, store: StagingStore) -> None:
    erp = Erp(store)
    svc = StockPushService(config(), store, [shop.connector])
    erp.set([(s, 1, 20, 0) for s in SKUS])
    svc.run_cycle()
    assert shop_has(shop, erp.expected())
    # Someone edits stock in the shop's admin: drift the pusher does not know about.
    drift = SKUS[3:8]
    shop.connector.push_stock([StockUpdate(s, 999) for s in drift])
    assert all(shop.stock()[s] == 999 for s in drift)
    progress: list[str] = []
    svc._progress.callback = progress.append
    summary = svc.reconcile()
    out = summary["shops"]["web"]
    assert out["differed"] == len(drift) and out["corrected"] == len(drift)
    assert shop_has(shop, erp.expected())
    assert any(p.startswith(f"Updating product {len(drift)} of {len(drift)}") for p in progress)
    assert svc.progress == "idle"
    assert svc.reconcile()["shops"]["web"]["differed"] == 0


def test_rate_limit_token_bucket(shop: Shop, store: StagingStore) -> None:
    erp = Erp(store)
    svc = StockPushService(config(rate_limit=10, burst=1, batch_size=2), store, [shop.connector])
    erp.set([(s, 1, 4, 0) for s in SKUS[:12]])  # 6 requests at 10/s with no burst: >= 0.5 s
    t0 = time.monotonic()
    svc.run_cycle()
    assert time.monotonic() - t0 >= 0.45
    assert shop_has(shop, erp.expected())
    assert len(shop.pushes) == 6


def test_token_bucket_pause() -> None:
    now = [0.0]
    bucket = TokenBucket(2, 2, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert bucket.try_acquire() and bucket.try_acquire() and not bucket.try_acquire()
    now[0] += 0.5
    assert bucket.try_acquire()
    bucket.pause(30)
    now[0] += 29
    assert not bucket.try_acquire()
    assert bucket.acquire()  # sleeps (on the fake clock) until the pause is over
    assert now[0] >= 30


def test_unimported_orders_subtracted(shop: Shop, store: StagingStore) -> None:
    from datetime import datetime

    from replicator.orders.ledger import Ledger

    ledger = Ledger(store.engine)
    now = datetime(2026, 1, 1)
    payload = json.dumps({"id": 7, "line_items": [{"sku": SKUS[0], "quantity": 3}]}).encode()
    with ledger.begin() as c:
        ledger.insert(
            c,
            shop="web",
            e_number="7",
            state="awaiting",
            payload=payload,
            payload_hash="x",
            first_seen=now,
            last_seen=now,
        )
        ledger.insert(
            c,
            shop="web",
            e_number="8",
            state="delivered",
            payload=payload,
            payload_hash="y",
            first_seen=now,
            last_seen=now,
        )
    erp = Erp(store)
    svc = StockPushService(config(subtract_unimported_orders=True), store, [shop.connector])
    erp.set([(SKUS[0], 1, 10, 0)])
    svc.run_cycle()
    assert shop.stock()[SKUS[0]] == 7  # the delivered order is already in the ERP's stock


def test_cycle_in_thread_with_stop(shop: Shop, store: StagingStore) -> None:
    erp = Erp(store)
    svc = StockPushService(config(), store, [shop.connector])
    stop = threading.Event()
    t = threading.Thread(target=svc.run_forever, args=(stop, 0.05), daemon=True)
    t.start()
    try:
        erp.set([(SKUS[4], 1, 42, 0)])
        deadline = time.monotonic() + 5
        while shop.stock()[SKUS[4]] != 42 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shop.stock()[SKUS[4]] == 42
    finally:
        stop.set()
        t.join(5)
    assert svc.status()["dirty_skus"] == {"web": 0}


LOTS = TableSchema(
    "public",
    "lots",
    (Column("id", "integer"), Column("sku", "text"), Column("qty", "integer")),
    ("id",),
)


def test_rows_keyed_by_id_deletes_and_truncate(shop: Shop, store: StagingStore) -> None:
    """SKU not in the key: updates look it up in the mirror; a delete or a truncate makes the
    pusher diff every SKU against what it last pushed (locally), so nothing is missed."""
    store.ensure_mirror(LOTS)
    cfg = config(tables=["lots"], reserved_column=None, warehouse_column=None)
    svc = StockPushService(cfg, store, [shop.connector])

    def apply(*changes: Change) -> None:
        txn = store.begin("erp")
        for ch in changes:
            txn.apply(ch)
        txn.commit(None)

    apply(
        *(
            Change("public.lots", "U", values={"id": i, "sku": SKUS[i % 4], "qty": 5})
            for i in range(12)
        )
    )
    svc.run_cycle()
    assert [shop.stock()[s] for s in SKUS[:4]] == [15, 15, 15, 15]
    apply(Change("public.lots", "D", key={"id": 0}), Change("public.lots", "D", key={"id": 4}))
    svc.run_cycle()
    assert shop.stock()[SKUS[0]] == 5 and shop.pushes[-1] == {SKUS[0]: 5}
    txn = store.begin("erp")
    txn.apply(Change("public.lots", "T", position="9"))
    txn.commit(None)
    svc.run_cycle()
    assert [shop.stock()[s] for s in SKUS[:4]] == [0, 0, 0, 0]
    assert svc.reader.committed == journal_max(store)


def test_one_shop_down_other_shop_served(store: StagingStore) -> None:
    woo, mag = Shop("woocommerce"), Shop("magento")
    try:
        mag.connector.name = "mag"
        now = [0.0]
        erp = Erp(store)
        svc = StockPushService(
            config(), store, [woo.connector, mag.connector], clock=lambda: now[0]
        )
        woo.emu.fail_next(10_000, status=502)
        erp.set([(s, 1, 6, 1) for s in SKUS[:6]])
        svc.run_cycle()
        assert shop_has(mag, erp.expected()) and not shop_has(woo, erp.expected())
        assert svc.reader.committed == 0  # WooCommerce still owes these
        woo.emu.clear_faults()
        now[0] += 1000
        svc.run_cycle()
        assert shop_has(woo, erp.expected())
        assert len(mag.pushes) == 1  # Magento is not sent anything twice
        assert svc.reader.committed == journal_max(store)
    finally:
        woo.close()
        mag.close()
