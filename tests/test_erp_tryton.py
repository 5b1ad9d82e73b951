"""Orders imported into a real Tryton 8.x (trytond + sale from PyPI, PostgreSQL) with the shipped
profile ``config/mappings/tryton.toml``, read back through Tryton's own API (proteus): lines,
taxes, addresses, party; Tryton's totals equal the shop's; the sale quotes and confirms; the
invoice total equals the order total."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

pytest.importorskip("trytond")
pytest.importorskip("proteus")

from proteus import Model
from proteus import config as pconfig

from replicator.db import make_engine
from replicator.orders.mappings import load_checked, make_writer
from replicator.orders.plan_writer import PlanWriter
from replicator.orders.sample import ROOT
from tests import test_orders_support as support
from tests.erp import tryton_db
from tests.erp.orders import taxed_order
from tests.helpers import wait_until
from tests.test_orders_support import erp_rows

service_factory = support.service_factory
TRYTON_MAPPING = ROOT / "config" / "mappings" / "tryton.toml"


@pytest.fixture
def tryton() -> Iterator[str]:
    """A fresh copy of the cached Tryton database; yields its name."""
    try:
        psycopg.connect(tryton_db.ADMIN_DSN, dbname="postgres", connect_timeout=3).close()
    except psycopg.Error as exc:  # pragma: no cover - environment dependent
        pytest.skip(f"no PostgreSQL for Tryton at {tryton_db.ADMIN_DSN}: {exc}")
    name = tryton_db.clone()  # builds the cached database on first use (about a minute)
    try:
        yield name
    finally:
        tryton_db.drop(name)


@pytest.fixture
def writer(tryton: str) -> Iterator[PlanWriter]:
    engine = make_engine(tryton_db.url(tryton), "test")
    mapping = load_checked(TRYTON_MAPPING, "postgresql", engine)
    w = make_writer(engine, mapping, create_index=False)
    assert isinstance(w, PlanWriter)
    yield w
    engine.dispose()


def proteus_config(database: str) -> Any:
    return pconfig.set_trytond(database=database, config_file=str(tryton_db.config_file()))


def read_sale(cfg: Any, reference: str) -> Any:
    Sale = Model.get("sale.sale", config=cfg)
    (sale,) = Sale.find([("reference", "=", reference)])
    return sale


def test_sale_quotes_confirms_and_invoices_with_the_shops_totals(tryton, writer):
    order = taxed_order(5004, lines=3, reduced=True)
    res = writer.write("woo", "5004", order)
    assert res.created and res.lines == 5  # 3 goods, 1 book at 7 %, shipping

    cfg = proteus_config(tryton)
    sale = read_sale(cfg, "WOO-5004")
    # The number Tryton users see came from Tryton's own "Sale" sequence, and the ledger has it.
    assert sale.number == res.order_number
    assert sale.party.name == "Anna Kunde5004"
    assert [c.value for c in sale.party.contact_mechanisms] == ["kunde5004@example.com"]
    assert sale.party.code  # numbered by Tryton's "Party" sequence
    assert sale.invoice_address.street_unstructured == "Hauptstr. 1"
    assert sale.shipment_address.street_unstructured == "Lieferweg 2"
    assert sale.shipment_address.country.code == "DE"
    assert sale.currency.code == "EUR" and sale.warehouse.code == "WH"
    lines = sorted(sale.lines, key=lambda ln: ln.sequence)
    assert [ln.product.code for ln in lines] == [
        *(i["sku"] for i in order["line_items"]),
        "SHIPPING",
    ]
    assert [[t.name for t in ln.taxes] for ln in lines] == [
        ["VAT 19%"],
        ["VAT 19%"],
        ["VAT 19%"],
        ["VAT 7%"],
        ["VAT 19%"],
    ]
    total = Decimal(order["total"])
    assert sale.untaxed_amount == total - Decimal(order["total_tax"])
    assert sale.tax_amount == Decimal(order["total_tax"])
    assert sale.total_amount == total

    sale.click("quote")
    assert sale.state == "quotation" and sale.number == res.order_number
    sale.click("confirm")
    assert sale.state in ("confirmed", "processing")
    sale.reload()
    (invoice,) = sale.invoices
    assert invoice.total_amount == total
    assert invoice.tax_amount == Decimal(order["total_tax"])


def test_known_new_and_guest_customers(tryton, writer):
    cfg = proteus_config(tryton)
    Party = Model.get("party.party", config=cfg)
    before = len(Party.find([]))
    writer.write("woo", "1", taxed_order(1, email="Known@Example.com"))
    writer.write("woo", "2", taxed_order(2, email=""))
    o3 = taxed_order(3, email="new@example.com")
    o4 = taxed_order(4, billing=o3["billing"], shipping=o3["shipping"])
    writer.write("woo", "3", o3)
    writer.write("woo", "4", o4)
    assert read_sale(cfg, "WOO-1").party.code == "KNOWN"
    assert read_sale(cfg, "WOO-2").party.code == "GUEST"
    new3, new4 = read_sale(cfg, "WOO-3").party, read_sale(cfg, "WOO-4").party
    assert new3.id == new4.id  # the second order found the customer the first created
    assert len(Party.find([])) == before + 1
    # Same addresses are reused, not duplicated.
    assert read_sale(cfg, "WOO-3").invoice_address.id == read_sale(cfg, "WOO-4").invoice_address.id


def test_one_sale_per_e_number_through_two_intake_paths_and_link_table(
    tryton, tmp_path: Path, service_factory
):
    (tmp_path / "mappings").mkdir()
    shutil.copy(TRYTON_MAPPING, tmp_path / "mappings" / "orders.toml")
    url = tryton_db.url(tryton)
    svc, shop = service_factory(url)
    order = taxed_order(7001, lines=2)
    shop.put(order)
    raw = shop.orders["7001"][1]
    assert svc.ingest_webhook_payload("shop", raw, "d-1") is True
    # Answered once stored; the woken import writes it right after.
    wait_until(lambda: svc.ledger.get("shop", "7001").state == "delivered", 60, 0.05)
    r = svc.run_cycle()  # the poll sees it again
    assert r.new == 0
    assert erp_rows(url, "SELECT count(*) FROM sale_sale WHERE reference = 'WOO-7001'") == [(1,)]
    entry = svc.ledger.get("shop", "7001")
    assert entry is not None and entry.state == "delivered"
    (number,) = erp_rows(url, "SELECT number FROM sale_sale WHERE reference = 'WOO-7001'")[0]
    assert entry.erp_order_no == number  # the ledger shows the number Tryton users see
    assert erp_rows(url, "SELECT shop, e_number, erp_number FROM sync_daemon_order_link") == [
        ("shop", "7001", number)
    ]
    # No index or constraint was added to Tryton's own tables.
    assert erp_rows(
        url,
        "SELECT count(*) FROM pg_indexes "
        "WHERE indexname LIKE 'sync%' AND tablename <> 'sync_daemon_order_link'",
    ) == [(0,)]


def test_order_changed_after_import_replaces_lines_and_keeps_the_number(tryton, writer):
    order = taxed_order(8001, lines=2)
    first = writer.write("woo", "8001", order)
    changed = taxed_order(8001, lines=4, reduced=True)
    res = writer.replace("woo", "8001", changed)
    assert res.order_number == first.order_number and res.lines == 6
    cfg = proteus_config(writer.engine.url.database or "")
    sale = read_sale(cfg, "WOO-8001")
    assert len(sale.lines) == 6
    assert sale.total_amount == Decimal(changed["total"])
    sale.click("quote")
    sale.click("confirm")
    # Confirmed: a further change needs --force.
    from replicator.orders.writer import OrderPosted

    with pytest.raises(OrderPosted):
        writer.replace("woo", "8001", order)


def test_unknown_sku_parks_the_order_with_the_table_and_value(tryton, writer):
    from replicator.mappers.orders import OrderRejected

    order = taxed_order(9001, lines=1)
    order["line_items"][0]["sku"] = "NOPE-1"
    with pytest.raises(OrderRejected) as exc:
        writer.write("woo", "9001", order)
    assert exc.value.kind == "mapping"
    assert "product_product where code = 'NOPE-1'" in exc.value.reason
    assert erp_rows(tryton_db.url(tryton), "SELECT count(*) FROM sale_sale") == [(0,)]


def test_dry_run_shows_every_row_and_writes_nothing(tryton, writer):
    with writer.engine.connect() as conn:
        tables = writer.dry_run(conn, "woo", "9101", taxed_order(9101, lines=2), False)
    assert list(tables) == [
        "party_party",
        "party_contact_mechanism",
        "party_address",
        "sale_sale",
        "sale_line",
        "sale_line-account_tax",
    ]
    assert len(tables["sale_line"]) == 3 and tables["sale_sale"][0]["reference"] == "WOO-9101"
    assert tables["sale_line"][0]["id"] is not None  # real generated keys, rolled back
    url = tryton_db.url(tryton)
    assert erp_rows(url, "SELECT count(*) FROM sale_sale") == [(0,)]
    assert erp_rows(url, "SELECT count(*) FROM sync_daemon_order_link") == [(0,)]


def test_kill9_during_a_burst_of_200_orders_each_e_number_exactly_once(
    tryton, writer, tmp_path: Path
):
    from tests.erp.burst import FIRST, run_with_kills

    url = tryton_db.url(tryton)

    def imported() -> int:
        return int(erp_rows(url, "SELECT count(*) FROM sync_daemon_order_link")[0][0])

    at_kill = run_with_kills(url, TRYTON_MAPPING, tmp_path, 200, tryton_db.KNOWN_EMAIL, imported)
    assert any(0 < n < 200 for n in at_kill), at_kill  # the kills landed inside the burst
    refs = erp_rows(url, "SELECT reference, count(*) FROM sale_sale GROUP BY reference")
    assert len(refs) == 200 and all(n == 1 for _, n in refs)
    assert {r for r, _ in refs} == {f"WOO-{FIRST + i}" for i in range(200)}
    assert imported() == 200
    # New customers were created once each, even when a kill hit between party and sale.
    parties = erp_rows(url, "SELECT count(*) FROM party_party WHERE code NOT IN ('GUEST','KNOWN')")
    assert parties[0][0] == 1 + 40  # the company's party and 40 new customers
    from replicator.orders.ledger import Ledger

    ledger = Ledger(f"sqlite:///{tmp_path / 'staging.db'}")
    try:
        states = {ledger.get("shop", str(FIRST + i)).state for i in range(200)}
    finally:
        ledger.close()
    assert states == {"delivered"}


def test_two_orders_of_one_new_customer_at_once_create_one_party(tryton, writer):
    from tests.erp.burst import at_once

    errors = at_once(
        [
            lambda n=n: writer.write("woo", str(n), taxed_order(n, email="twice@example.com"))
            for n in range(600, 604)
        ]
    )
    assert not errors
    url = tryton_db.url(tryton)
    assert erp_rows(
        url,
        "SELECT count(*) FROM party_contact_mechanism WHERE value = 'twice@example.com'",
    ) == [(1,)]
    assert erp_rows(url, "SELECT count(DISTINCT party), count(*) FROM sale_sale") == [(1, 4)]


def test_an_index_on_the_erps_e_number_column_only_when_asked(tryton, tmp_path: Path):
    text = TRYTON_MAPPING.read_text().replace(
        "[order]\n", '[order]\ne_number_column = "reference"\ne_number_index = true\n'
    )
    mapping_file = tmp_path / "tryton.toml"
    mapping_file.write_text(text)
    engine = make_engine(tryton_db.url(tryton), "test")
    try:
        for _ in range(2):  # a restart finds it
            make_writer(
                engine, load_checked(mapping_file, "postgresql", engine), create_index=False
            )
    finally:
        engine.dispose()
    assert erp_rows(
        tryton_db.url(tryton),
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'sync_sale_sale_reference'",
    ) == [
        (
            "CREATE INDEX sync_sale_sale_reference ON public.sale_sale USING btree (reference) "
            "WHERE (reference IS NOT NULL)",
        )
    ]


def test_map_dry_run_cli_prints_the_plans_rows(tryton, tmp_path: Path):
    import json
    import subprocess
    import sys

    order = tmp_path / "order.json"
    order.write_text(json.dumps(taxed_order(9201, lines=1)))
    config = tmp_path / "config.toml"
    config.write_text(
        f'[erp]\ndsn = "{tryton_db.url(tryton)}"\n[capture]\ntables = ["public.sale_sale"]\n'
        f'[staging]\nurl = "sqlite:///{tmp_path / "staging.db"}"\n'
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        f'[orders]\nenabled = true\nmapping = "{TRYTON_MAPPING}"\n'
    )
    config.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "sync_daemon.py", "map", "--dry-run", str(order), "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "-- sale_sale (1 row)" in proc.stdout
    assert "-- sale_line (2 rows)" in proc.stdout
    assert "-- sale_line-account_tax (2 rows)" in proc.stdout
    assert '"reference": "WOO-9201"' in proc.stdout
    assert "rolled back: nothing was written" in proc.stdout
    assert erp_rows(tryton_db.url(tryton), "SELECT count(*) FROM sale_sale") == [(0,)]
