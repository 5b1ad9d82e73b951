"""Booked invoices against the loopback WooCommerce, Magento, Shopify and Shopware emulators:
attached once, drafts
and deletions ignored, a missing PDF is a recorded failure (also in the order timeline), a shop
outage delays but loses nothing, the e-number found via the ERP order, the PDF from a column."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.changes import Change, Column, TableSchema
from replicator.config import Config, parse_config
from replicator.connectors.base import ShopConnector
from replicator.connectors.magento import MagentoConnector
from replicator.connectors.shopify import ShopifyConnector
from replicator.connectors.shopware import ShopwareConnector
from replicator.connectors.woocommerce import WooCommerceConnector
from replicator.orders.ledger import Ledger
from replicator.push.invoices import InvoicePushService
from replicator.staging import StagingStore
from tests.emulators import MagentoEmulator, WooCommerceEmulator, generate_orders
from tests.emulators.shopify import ShopifyEmulator
from tests.emulators.shopware import ShopwareEmulator

INVOICES = TableSchema(
    "public",
    "invoices",
    (
        Column("id", "integer"),
        Column("invoice_no", "text"),
        Column("status", "text"),
        Column("e_number", "text"),
        Column("order_id", "integer"),
        Column("pdf", "bytea"),
    ),
    ("id",),
)
ORDERS = TableSchema(
    "public", "orders", (Column("id", "integer"), Column("e_number", "text")), ("id",)
)


class Shop:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.orders = generate_orders(5, seed=3)
        self.emu: Any
        self.connector: ShopConnector
        if kind == "shopify":
            self.emu = ShopifyEmulator(products=[])
            self.emu.add_orders(self.orders)
            self.emu.start()
            self.connector = ShopifyConnector("web", self.emu.url, self.emu.access_token, timeout=5)
        elif kind == "shopware":
            self.emu = ShopwareEmulator(products=[])
            self.emu.add_orders(self.orders)
            self.emu.start()
            self.connector = ShopwareConnector(
                "web", self.emu.url, self.emu.client_id, self.emu.client_secret, timeout=5
            )
        elif kind == "woocommerce":
            woo = WooCommerceEmulator(products=[])
            woo.add_orders(self.orders)
            woo.start()
            self.emu = woo
            self.connector = WooCommerceConnector(
                "web", woo.url, woo.consumer_key, woo.consumer_secret, timeout=5
            )
        else:
            mag = MagentoEmulator(products=[])
            mag.add_orders(self.orders)
            mag.start()
            self.emu = mag
            self.connector = MagentoConnector("web", mag.url, mag.token, timeout=5)

    def e_number(self, i: int) -> str:
        n = self.orders[i].number
        return {"woocommerce": str(n), "shopify": f"#{n}", "shopware": str(n)}.get(
            self.kind, f"{n:09d}"
        )

    def notes(self, i: int) -> list[str]:
        """Where the invoice shows on the shop order: notes, comments, metafield lines,
        documents (by file name)."""
        if isinstance(self.emu, ShopifyEmulator):
            value = self.emu.metafield(self.orders[i].number, "sync_daemon", "erp_invoice")
            return value.splitlines() if value else []
        if isinstance(self.emu, ShopwareEmulator):
            docs = self.emu.order_documents(str(self.orders[i].number))
            return [f"{d['fileName']} ({len(d['content'])} bytes)" for d in docs if d["fileName"]]
        if isinstance(self.emu, WooCommerceEmulator):
            return [n["note"] for n in self.emu.notes.get(self.orders[i].number, [])]
        eid = self.emu.entity_id(self.e_number(i))
        return [c["comment"] for c in self.emu.comments.get(eid, [])]

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
def store(staging_url: str) -> Iterator[StagingStore]:
    """Staging on SQLite and on PostgreSQL (the conftest's ``staging_url``)."""
    st = StagingStore(staging_url)
    st.setup()
    st.ensure_mirror(INVOICES)
    st.ensure_mirror(ORDERS)
    try:
        yield st
    finally:
        st.dispose()


def config(tmp_path: Path, **push: Any) -> Config:
    return parse_config(
        {
            "erp": {"dsn": "postgresql://erp@127.0.0.1:1/erp"},
            "capture": {"tables": ["public.invoices", "public.orders"]},
            "invoice_push": {
                "table": "invoices",
                "e_number_column": "e_number",
                "pdf_source": "path",
                "pdf_path": str(tmp_path / "pdf" / "{invoice_no}.pdf"),
                "filename": "invoice-{number}.pdf",
                "retry_seconds": 0,
                "max_attempts": 3,
                **push,
            },
        }
    )


def put(store: StagingStore, table: str, op: str, **values: Any) -> None:
    txn = store.begin("erp")
    if op == "D":
        txn.apply(Change(table, "D", key=values))
    else:
        txn.apply(Change(table, "U", values=values))
    txn.commit(None)


def invoice(store: StagingStore, id: int, status: str, e_number: str | None, **kw: Any) -> None:
    put(
        store,
        "public.invoices",
        "U",
        id=id,
        invoice_no=f"F{id}",
        status=status,
        e_number=e_number,
        order_id=kw.get("order_id"),
        pdf=kw.get("pdf"),
    )


def write_pdf(tmp_path: Path, number: str) -> None:
    (tmp_path / "pdf").mkdir(exist_ok=True)
    (tmp_path / "pdf" / f"{number}.pdf").write_bytes(b"%PDF-1.7 invoice " + number.encode())


def test_booked_invoice_attached_once(shop: Shop, store: StagingStore, tmp_path: Path) -> None:
    svc = InvoicePushService(config(tmp_path), store, [shop.connector])
    write_pdf(tmp_path, "F1")
    write_pdf(tmp_path, "F2")
    invoice(store, 1, "draft", shop.e_number(0))
    invoice(store, 2, "draft", shop.e_number(1))
    assert svc.run_cycle()["queued"] == 0
    assert shop.notes(0) == [] and shop.notes(1) == []
    invoice(store, 1, "booked", shop.e_number(0))
    s = svc.run_cycle()
    assert s["attached"] == 1
    assert len(shop.notes(0)) == 1 and "invoice-F1.pdf" in shop.notes(0)[0]
    # Touched again, re-read after a restart, deleted: never attached a second time.
    invoice(store, 1, "booked", shop.e_number(0))
    svc.run_cycle()
    svc.close()
    svc = InvoicePushService(config(tmp_path), store, [shop.connector])
    with store.engine.begin() as c:
        c.exec_driver_sql("DELETE FROM sync_cursors")  # replay the whole journal
    svc.reader.committed = svc.reader.read_upto = 0
    put(store, "public.invoices", "D", id=1)
    svc.run_cycle()
    assert len(shop.notes(0)) == 1
    assert shop.notes(1) == []  # still a draft
    assert [i["state"] for i in svc.invoices()] == ["attached"]


def test_missing_pdf_is_recorded_failure(shop: Shop, store: StagingStore, tmp_path: Path) -> None:
    ledger = Ledger(store.engine)
    svc = InvoicePushService(config(tmp_path), store, [shop.connector], ledger=ledger)
    invoice(store, 3, "booked", shop.e_number(2))
    s = svc.run_cycle()
    assert s["failed"] == 1
    (inv,) = svc.invoices()
    assert inv["state"] == "failed" and "PDF not found" in inv["last_error"]
    assert "F3.pdf" in inv["last_error"]
    events = ledger.events("web", shop.e_number(2))
    assert [e.event for e in events] == ["invoice_failed"]
    assert shop.notes(2) == []
    # The PDF shows up: the next attempt attaches it.
    write_pdf(tmp_path, "F3")
    assert svc.run_cycle()["attached"] == 1
    assert len(shop.notes(2)) == 1
    assert [e.event for e in ledger.events("web", shop.e_number(2))][-1] == "invoice_attached"


def test_shop_outage_then_attached(shop: Shop, store: StagingStore, tmp_path: Path) -> None:
    now = [0.0]
    svc = InvoicePushService(config(tmp_path), store, [shop.connector], clock=lambda: now[0])
    write_pdf(tmp_path, "F4")
    invoice(store, 4, "booked", shop.e_number(3))
    shop.emu.fail_next(50, status=503)
    s = svc.run_cycle()
    assert s["waiting"] == 1 and s["attached"] == 0
    assert svc.invoices()[0]["state"] == "pending"
    assert svc.reader.committed > 0  # queued durably, so the journal may move on
    shop.emu.clear_faults()
    now[0] += 600
    assert svc.run_cycle()["attached"] == 1
    assert len(shop.notes(3)) == 1


def test_e_number_via_erp_order_and_pdf_column(
    shop: Shop, store: StagingStore, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path,
        e_number_column=None,
        order_column="order_id",
        order_table="orders",
        pdf_source="column",
        pdf_column="pdf",
        pdf_path=None,
    )
    svc = InvoicePushService(cfg, store, [shop.connector])
    put(store, "public.orders", "U", id=77, e_number=shop.e_number(4))
    put(store, "public.orders", "U", id=78, e_number=None)
    invoice(store, 5, "booked", None, order_id=77, pdf=b"%PDF-1.4 five")
    invoice(store, 6, "booked", None, order_id=78, pdf=b"%PDF-1.4 six")
    invoice(store, 7, "booked", None, order_id=77, pdf=None)
    svc.run_cycle()
    states = {i["number"]: (i["state"], i["last_error"]) for i in svc.invoices()}
    assert states["F5"] == ("attached", None)
    assert states["F6"][0] == "failed" and "no e-number" in states["F6"][1]
    assert states["F7"][0] == "failed" and "no PDF" in states["F7"][1]
    assert len(shop.notes(4)) == 1 and "13 bytes" in shop.notes(4)[0]


def test_config_errors() -> None:
    from replicator.errors import ConfigError

    with pytest.raises(ConfigError, match="e-number"):
        parse_config(
            {
                "erp": {"dsn": "postgresql://x@h/db"},
                "capture": {"tables": ["a.b"]},
                "invoice_push": {"table": "invoices", "pdf_path": "/x/{id}.pdf"},
            }
        )
    with pytest.raises(ConfigError, match="pdf_column"):
        parse_config(
            {
                "erp": {"dsn": "postgresql://x@h/db"},
                "capture": {"tables": ["a.b"]},
                "invoice_push": {
                    "table": "invoices",
                    "e_number_column": "e",
                    "pdf_source": "column",
                },
            }
        )
    with pytest.raises(ConfigError, match="reconcile_schedule"):
        parse_config(
            {
                "erp": {"dsn": "postgresql://x@h/db"},
                "capture": {"tables": ["a.b"]},
                "stock_push": {"table": "stock", "reconcile_schedule": "sometimes"},
            }
        )


def test_pdf_from_url(shop: Shop, store: StagingStore, tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Pdfs(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = b"%PDF-1.5 from url" if self.path == "/pdf/F8" else b"nope"
            self.send_response(200 if self.path == "/pdf/F8" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pdfs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pdf/{{invoice_no}}"
        svc = InvoicePushService(
            config(tmp_path, pdf_source="url", pdf_url=url), store, [shop.connector]
        )
        invoice(store, 8, "booked", shop.e_number(0))
        invoice(store, 9, "booked", shop.e_number(1))
        svc.run_cycle()
        states = {i["number"]: (i["state"], i["last_error"]) for i in svc.invoices()}
        assert states["F8"] == ("attached", None)
        assert states["F9"][0] == "failed" and "404" in states["F9"][1]
        assert len(shop.notes(0)) == 1 and shop.notes(1) == []
        svc.close()
    finally:
        server.shutdown()
        server.server_close()


_WORKER = """
import sys
from pathlib import Path
from replicator.connectors.magento import MagentoConnector
from replicator.connectors.woocommerce import WooCommerceConnector
from replicator.push.invoices import InvoicePushService
from replicator.staging import StagingStore
from tests.test_push_invoices import config

kind, url, key, secret, staging, tmp = sys.argv[1:7]
if kind == "woocommerce":
    conn = WooCommerceConnector("web", url, key, secret, timeout=5)
else:
    conn = MagentoConnector("web", url, key, timeout=5)
store = StagingStore(staging)
store.setup()
svc = InvoicePushService(config(Path(tmp)), store, [conn])
print(svc.run_cycle(), flush=True)
svc.close()
"""


def test_kill9_between_shop_accept_and_our_commit_attaches_once(
    shop: Shop, store: StagingStore, staging_url: str, tmp_path: Path
) -> None:
    """The push runs in its own process, frozen by a failpoint right after the shop accepted
    the note and before ``attached`` is committed, then killed with SIGKILL. The next process
    finds the invoice still pending, reads the order's notes back, and does not attach again."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from tests.helpers import ROOT, wait_until

    if shop.kind not in ("woocommerce", "magento"):
        pytest.skip("Shopify and Shopware record invoices through their own idempotent APIs")
    write_pdf(tmp_path, "F1")
    invoice(store, 1, "booked", shop.e_number(0))
    if isinstance(shop.emu, WooCommerceEmulator):
        creds = [shop.emu.consumer_key, shop.emu.consumer_secret]
    else:
        creds = [shop.emu.token, ""]
    args = [sys.executable, "-c", _WORKER, shop.kind, shop.emu.url, *creds, staging_url]
    args.append(str(tmp_path))
    env = {**os.environ, "SYNC_DAEMON_FAILPOINT": "invoices.attach@1"}
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        wait_until(lambda: psutil.Process(first.pid).status() == psutil.STATUS_STOPPED, 60, 0.05)
        assert len(shop.notes(0)) == 1  # the shop accepted it; our commit did not happen
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    env.pop("SYNC_DAEMON_FAILPOINT")
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "'attached': 1" in second.stdout, second.stdout
    assert len(shop.notes(0)) == 1, shop.notes(0)
    assert "invoice-F1.pdf" in shop.notes(0)[0]
