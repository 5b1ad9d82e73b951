"""A mapping that no longer fits the ERP (its schema changed under the running daemon) parks
orders as mapping problems and makes the order service not ready, until it fits again; and
``check-config --connect`` validates every mapping with the messages start-up prints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.db import make_engine
from replicator.errors import ConfigError
from replicator.orders.coordinator import OrderImportService
from replicator.orders.mappings import load_checked
from replicator.orders.sample import ROOT, ListShop, sample_order
from tests import test_orders_support as support
from tests.test_orders_support import erp_rows, make_config

_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url
service_factory = support.service_factory


def _alter(url: str, sql: str) -> None:
    from replicator.db import make_engine

    engine = make_engine(url, "dba")
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()


def test_schema_change_parks_orders_and_the_order_service_is_not_ready(pg_erp_url, service_factory):
    svc, shop = service_factory(pg_erp_url)
    shop.put(sample_order(1))
    assert svc.run_cycle().new == 1
    assert svc.readiness()[0] is True

    _alter(pg_erp_url, "ALTER TABLE order_line RENAME COLUMN description TO descr")
    shop.put(sample_order(2))
    svc.run_cycle()
    entry = svc.ledger.get("shop", "2")
    assert entry is not None and entry.state == "failed" and entry.error_kind == "mapping"
    assert "the mapping no longer fits the ERP" in (entry.last_error or "")
    # The next cycle re-validates: /readyz shows the start-up message naming file and key.
    shop.put(sample_order(3))
    svc.run_cycle()
    ok, detail = svc.readiness()
    assert ok is False
    assert "lines.columns.description: column 'description' does not exist in table" in detail

    _alter(pg_erp_url, "ALTER TABLE order_line RENAME COLUMN descr TO description")
    svc.run_cycle()
    assert svc.readiness() == (True, "mappings fit the ERP")
    # The orders parked meanwhile were retried and imported.
    assert erp_rows(pg_erp_url, "SELECT count(*) FROM order_header") == [(3,)]
    assert svc.ledger.get("shop", "2").state == "delivered"


def test_check_config_connect_gives_start_up_messages_for_a_plan_mapping(
    tmp_path: Path, pg_erp_url
):
    (tmp_path / "mappings").mkdir()
    shutil.copy(
        ROOT / "config" / "mappings" / "dolibarr.toml", tmp_path / "mappings" / "orders.toml"
    )
    cfg = make_config(tmp_path, pg_erp_url)
    # Start-up: the order service starts not ready and says why (capture would go on).
    svc = OrderImportService(cfg, {"shop": ListShop("shop")})
    try:
        ready, detail = svc.readiness()
    finally:
        svc.close()
    assert not ready
    engine = make_engine(pg_erp_url, "test")
    try:
        with pytest.raises(ConfigError) as startup:  # what start-up runs
            load_checked(tmp_path / "mappings" / "orders.toml", "postgresql", engine)
    finally:
        engine.dispose()
    for m in str(startup.value).splitlines():
        assert m.split(": ", 1)[1] in detail
    config = tmp_path / "config.toml"
    config.write_text(
        f'[erp]\ndsn = "{pg_erp_url}"\n[capture]\ntables = ["public.order_header"]\n'
        f'[staging]\nurl = "sqlite:///{tmp_path / "staging.db"}"\n'
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[orders]\nenabled = true\n[[shops]]\nname = "shop"\nkind = "woocommerce"\n'
        'url = "http://127.0.0.1:9/"\nconsumer_key = "ck"\nconsumer_secret = "cs"\n'
    )
    config.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "sync_daemon.py", "check-config", "--connect", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    messages = str(startup.value).splitlines()
    assert any(
        "header.table: table 'llx_commande' does not exist in the ERP" in m for m in messages
    )
    for m in messages:  # printed as the FAIL line of the mapping check
        assert m in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_item_into_an_integer_foreign_key_validates_and_writes_the_integer(
    tmp_path: Path, pg_erp_url
):
    from replicator.db import make_engine
    from replicator.mappers.orders import load_mapping, validate_mapping
    from replicator.orders.writer import ErpWriter

    _alter(
        pg_erp_url,
        "CREATE TABLE product (id serial PRIMARY KEY, sku text UNIQUE);"
        "INSERT INTO product (sku) SELECT 'SKU-X' || n FROM generate_series(1, 50) n;"
        "ALTER TABLE order_line DROP CONSTRAINT order_line_item_no_fkey;"
        "ALTER TABLE order_line ADD COLUMN product_id int REFERENCES product (id)",
    )
    text = (ROOT / "config" / "mappings" / "orders.toml").read_text()
    text = text.replace(
        'item_no = "item(line.sku)"', 'item_no = "line.sku"\nproduct_id = "item(line.sku)"'
    )
    text = text.replace(
        'table = "items"\nsku_column = "sku"\nitem_column = "item_no"',
        'table = "product"\nsku_column = "sku"\nitem_column = "id"',
    )
    path = tmp_path / "orders.toml"
    path.write_text(text)
    engine = make_engine(pg_erp_url, "test")
    try:
        m = load_mapping(path, "postgresql")
        validate_mapping(m, engine)  # "yields str but order_line.product_id is INTEGER" before
        ErpWriter(engine, m).write("shop", "1", sample_order(1, skus=["SKU-X7"]))
    finally:
        engine.dispose()
    assert erp_rows(
        pg_erp_url,
        "SELECT l.product_id, p.sku FROM order_line l JOIN product p ON p.id = l.product_id",
    ) == [(7, "SKU-X7")]


def test_plan_mapping_errors_name_file_and_key(tmp_path: Path):
    from replicator.mappers.plan import load_any

    text = (ROOT / "config" / "mappings" / "tryton.toml").read_text()
    text = (
        text.replace("code = \"next_number('party')\"", "code = \"next_number('nope')\"")
        .replace(
            "currency = \"lookup('currency_currency', 'id', 'code', upper(order.currency))\"",
            "currency = \"lookup(order.table, 'id', 'code', order.currency)\"",
        )
        .replace('sequence = "line_no"', 'sequence = "item(line.sku)"')
        .replace('table = "sale_line"', 'table = "sale_line; DROP TABLE x"')
    )
    path = tmp_path / "tryton.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_any(path, "postgresql")
    msg = str(exc.value)
    assert f"{path}: customer.rows[0].columns.code: next_number() needs one of: party, sale" in msg
    assert "header.columns.currency: lookup(table, column, filter_column, value, ...) needs" in msg
    assert "lines.columns.sequence: item() is not available in a plan mapping" in msg
    assert "lines.table: 'sale_line; DROP TABLE x' is not a plain name" in msg
