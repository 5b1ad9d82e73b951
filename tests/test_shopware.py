"""Shopware 6 beyond the shared connector contract: the client-credentials token, orders nobody
touched since checkout (``updatedAt`` null), the one-transaction sync, invoice documents (and their
fallback), and app webhooks — against the loopback Admin API emulator."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import httpx

from replicator.connectors.base import StockUpdate
from replicator.connectors.shopware import ShopwareConnector, ShopwareWebhookReceiver
from replicator.connectors.webhook import MemoryWebhookStore
from tests.emulators.orders import generate_orders, generate_products, sample_skus
from tests.emulators.shopware import ShopwareEmulator
from tests.helpers import wait_until

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def _conn(emu: ShopwareEmulator, **kw: object) -> ShopwareConnector:
    return ShopwareConnector("sw", emu.url, emu.client_id, emu.client_secret, **kw)  # type: ignore[arg-type]


def test_token_is_renewed_before_it_expires_and_after_a_revocation() -> None:
    with ShopwareEmulator(products=[], token_ttl=1.0) as emu:
        emu.add_orders(generate_orders(2, start=T0))
        c = _conn(emu)
        assert len(list(c.fetch_orders(T0 - timedelta(days=1)))) == 2
        assert emu.tokens_issued == 1
        wait_until(lambda: time.monotonic() >= c.auth.renew_at, timeout=5)
        assert len(list(c.fetch_orders(T0 - timedelta(days=1)))) == 2
        assert emu.tokens_issued == 2
        assert not [r for r in emu.requests if r.status == 401]  # renewed ahead, never refused
        emu.token_ttl = 600
        c.fetch_order("1001")
        emu.expire_tokens()  # e.g. the shop was restored from a backup
        assert c.fetch_order("1002") is not None  # one 401, one new token, one retry
        assert len([r for r in emu.requests if r.status == 401]) == 1
        c.close()


def test_orders_never_updated_since_checkout_are_found_by_creation_time() -> None:
    orders = generate_orders(6, start=T0, spacing=timedelta(hours=1))
    with ShopwareEmulator(products=[]) as emu:
        emu.add_orders(orders[:3])
        emu.add_orders(orders[3:], touched=False)  # updatedAt null
        c = _conn(emu)
        window = list(
            c.fetch_orders(T0 + timedelta(minutes=30), T0 + timedelta(hours=4, minutes=30))
        )
        assert [o.e_number for o in window] == ["1002", "1003", "1004", "1005"]
        assert [o.updated_at for o in window] == sorted(o.updated_at for o in window)
        assert window[-1].updated_at == orders[4].created  # no updatedAt: created is the time
        c.close()


def test_sync_refusal_reports_the_product_and_writes_the_others() -> None:
    skus = sample_skus(5)
    with ShopwareEmulator(products=generate_products(skus)) as emu:
        c = _conn(emu)
        c.push_stock([StockUpdate(s, 1) for s in skus])  # resolves and caches the ids
        gone = next(p for p in emu.products.values() if p["productNumber"] == skus[2])
        del emu.products[gone["id"]]  # deleted in the shop since
        skipped = c.push_stock([StockUpdate(s, 70 + i) for i, s in enumerate(skus)])
        assert skipped == [skus[2]]
        assert emu.stock() == {s: 70 + i for i, s in enumerate(skus) if s != skus[2]}
        # One refused request (one transaction: nothing written), one with the rest.
        assert emu.count("POST", "/api/_action/sync") == 3
        c.close()


def test_invoice_document_once_and_a_half_done_one_is_finished() -> None:
    with ShopwareEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(3, start=T0))
        c = _conn(emu)
        c.attach_invoice("1002", "INV-2026-0042.pdf", b"%PDF-1.4 42")
        c.attach_invoice("1002", "INV-2026-0042.pdf", b"%PDF-1.4 42")
        docs = emu.order_documents("1002")
        assert [(d["fileName"], d["config"]["documentNumber"], d["content"]) for d in docs] == [
            ("INV-2026-0042.pdf", "INV-2026-0042", b"%PDF-1.4 42")
        ]
        # Created, then the process died before the upload: the next attempt uploads to it.
        token = httpx.post(
            emu.url + "/api/oauth/token",
            json={
                "grant_type": "client_credentials",
                "client_id": emu.client_id,
                "client_secret": emu.client_secret,
            },
        ).json()["access_token"]
        httpx.post(
            emu.url + "/api/_action/order/document/invoice/create",
            json=[
                {
                    "orderId": emu.order_id("1003"),
                    "static": True,
                    "config": {"documentNumber": "INV-43"},
                }
            ],
            headers={"Authorization": f"Bearer {token}"},
        ).raise_for_status()
        c.attach_invoice("1003", "INV-43.pdf", b"%PDF-1.4 43")
        docs = emu.order_documents("1003")
        assert len(docs) == 1 and docs[0]["content"] == b"%PDF-1.4 43"
        c.close()


def test_invoice_fallback_without_document_privilege() -> None:
    with ShopwareEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(1, start=T0))
        emu.documents_allowed = False
        c = _conn(emu, invoice_url="https://erp.example/inv/{filename}")
        c.attach_invoice("1001", "INV-9.pdf", b"%PDF")
        c.attach_invoice("1001", "INV-9.pdf", b"%PDF")
        rec = emu.by_number("1001")
        assert rec is not None
        field = rec["customFields"]["sync_daemon_invoice"]
        assert "INV-9.pdf" in field and "https://erp.example/inv/INV-9.pdf" in field
        assert len(field.splitlines()) == 1
        assert emu.order_documents("1001") == []
        c.close()


def test_app_webhook_carries_the_order_verified_and_deduplicated() -> None:
    with ShopwareEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(1, start=T0))
        store = MemoryWebhookStore()
        rcv = ShopwareWebhookReceiver(emu.shop_secret, 1_000_000, store, shop="sw")
        headers, body = emu.webhook_request("1001", event_id="ev-1")
        headers["Content-Length"] = str(len(body))
        assert rcv.handle(headers, body) == (200, {"status": "stored", "e_number": "1001"})
        assert rcv.handle(headers, body)[1]["status"] == "duplicate"
        d = store.deliveries[0]
        assert d.trusted_e_number and d.topic == "checkout.order.placed"
        # What the ledger gets is the order itself, in the shape the Admin API search returns.
        polled = _conn(emu).fetch_order("1001")
        assert polled is not None
        assert set(json.loads(d.raw)) == set(polled.payload)
        assert rcv.handle(headers, body.replace(b"1001", b"1009"))[0] == 401
        assert rcv.handle({**headers, "shopware-shop-signature": "00" * 32}, body)[0] == 401
        # An event without an order (entity written: ids only) is acknowledged, nothing stored.
        bare = b'{"data":{"payload":[{"entity":"order","primaryKey":"x"}],"event":"order.written"}}'
        sig = hmac.new(emu.shop_secret.encode(), bare, hashlib.sha256).hexdigest()
        answer = rcv.handle(
            {"shopware-shop-signature": sig, "Content-Length": str(len(bare))}, bare
        )
        assert answer == (200, {"status": "ignored"})
        assert len(store.deliveries) == 1


def test_the_emulator_reads_filter_dates_like_mysql_and_counts_like_shopware() -> None:
    with ShopwareEmulator(products=[]) as emu:
        emu.add_orders(generate_orders(30, start=T0))
        c = _conn(emu)
        c.fetch_order("1001")  # a token

        def search(body: dict[str, object]) -> httpx.Response:
            return c.http.client.post("/search/order", json=body)

        window = {
            "type": "range",
            "field": "updatedAt",
            "parameters": {"gte": "2026-11-01T08:00:00Z"},
        }
        assert search({"filter": [window]}).status_code == 500  # MySQL refuses the 'Z'
        # Without total-count-mode the total is the page's size, not the number of orders.
        assert search({"limit": 10}).json()["total"] == 10
        assert search({"limit": 10, "total-count-mode": 1}).json()["total"] == 30
        # Associations are only there when asked for.
        assert search({"limit": 1}).json()["data"][0]["lineItems"] is None
        c.close()
