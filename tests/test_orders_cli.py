"""The order CLI: ``download`` counters, ``orders``, ``order`` (timeline), ``retry``, ``updates``,
``gaps``, ``map --dry-run`` — through ``sync-daemon``'s real argument parsing and config loading,
and one end-to-end run through the WooCommerce emulator."""

from __future__ import annotations

import argparse
import io
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from replicator.cli import main
from replicator.commands.orders import parse_time, run_download, run_gaps
from replicator.orders.coordinator import OrderImportService
from replicator.orders.sample import SAMPLE_MAPPING, ListShop, sample_order
from tests import test_orders_support as support
from tests.test_orders_support import erp_count, erp_rows, make_config

# Fixtures shared by the order tests (pytest finds them as module attributes).
pg_erp_url = support.pg_erp_url
_pg_erp_template = support._pg_erp_template


def _config_file(tmp_path: Path, erp_url: str, shops: str = "") -> Path:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    shutil.copy(SAMPLE_MAPPING, tmp_path / "mappings" / "orders.toml")
    p = tmp_path / "config.toml"
    p.write_text(
        f'[erp]\ndsn = "{erp_url}"\n\n[capture]\ntables = ["public.order_header"]\n\n'
        f'[staging]\nurl = "sqlite:///{tmp_path / "staging.db"}"\n\n'
        f'[daemon]\nstate_dir = "{tmp_path}"\n\n'
        "[orders]\nenabled = true\nbackoff_initial = 0.0\nbackoff_max = 0.0\n"
        "retry_attempts = 2\n\n" + shops
    )
    p.chmod(0o600)
    return p


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _seed(tmp_path: Path, erp_url: str) -> None:
    """Import a few orders (one failing, one skipped) through the service over a ListShop."""
    shop = ListShop("shop")
    shop.put(sample_order(1))
    shop.put(sample_order(2, skus=["AB-12"]))
    shop.put(sample_order(3, status="on-hold"))
    cfg = make_config(tmp_path, erp_url)
    out = io.StringIO()
    args = argparse.Namespace(since=None, until=None, shop=None)
    assert run_download(cfg, args, out, connectors={"shop": shop}) == 0
    text = out.getvalue()
    assert "download: total 3, new 1, skipped 1, errored 1" in text
    assert "  errored  shop/2: line 1: SKU 'AB-12' has no ERP item" in text
    assert "  skipped  shop/3: status 'on-hold' is not imported" in text
    assert "shop shop: ok" in text


def test_orders_order_retry_updates_through_cli(tmp_path, pg_erp_url, capsys):
    cfg_path = _config_file(tmp_path, pg_erp_url)
    _seed(tmp_path, pg_erp_url)
    capsys.readouterr()

    code, out = _run(capsys, "orders", "--config", str(cfg_path), "--status", "failed")
    assert code == 0
    assert "delivered 1, failed 1, skipped 1" in out
    assert "SKU 'AB-12' has no ERP item" in out and "shop         1 " not in out

    code, out = _run(capsys, "order", "2", "--config", str(cfg_path))
    assert code == 0
    assert "state          failed" in out
    assert "timeline:" in out and "downloaded: via poll" in out
    assert "failed: line 1: SKU 'AB-12' has no ERP item" in out
    assert "None" not in out and "erp order no   -" in out  # not Python's None

    # `orders`: a header, then the newest order first.
    code, out = _run(capsys, "orders", "--config", str(cfg_path))
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("SHOP"))
    assert "E-NUMBER" in lines[header] and "FIRST SEEN (UTC)" in lines[header]
    assert [ln.split()[1] for ln in lines[header + 1 :]] == ["3", "2", "1"]

    # Someone creates the item in the ERP; retry imports the order at once.
    from replicator.db import make_engine

    eng = make_engine(pg_erp_url, "test")
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO items VALUES ('I-AB12', 'AB-12', 'AB 12', 1)")
    eng.dispose()
    code, out = _run(capsys, "retry", "2", "--config", str(cfg_path))
    assert code == 0 and "shop/2: delivered (ERP order SO100002)" in out
    assert erp_count(pg_erp_url, "order_header") == 2

    code, out = _run(capsys, "retry", "2", "--config", str(cfg_path))
    assert code == 1 and "order 2 is delivered (ERP order SO100002); nothing to retry" in out

    code, out = _run(capsys, "updates", "--config", str(cfg_path))
    assert code == 0 and "no pending updates" in out
    code, out = _run(capsys, "order", "404", "--config", str(cfg_path))
    assert code == 1


def test_map_dry_run_through_cli(tmp_path, pg_erp_url, capsys):
    cfg_path = _config_file(tmp_path, pg_erp_url)
    order = tmp_path / "o.json"
    order.write_text(__import__("json").dumps(sample_order(5, skus=["SKU-1"])))
    code, out = _run(capsys, "map", "--dry-run", str(order), "--config", str(cfg_path))
    assert code == 0 and '"item_no": "I-0001"' in out
    order.write_text(__import__("json").dumps(sample_order(5, skus=["ZZ-9"])))
    code, out = _run(capsys, "map", "--dry-run", str(order), "--config", str(cfg_path))
    assert code == 1 and "cannot map: line 1: SKU 'ZZ-9' has no ERP item" in out
    assert erp_count(pg_erp_url, "order_header") == 0


def test_gaps_report(tmp_path, pg_erp_url):
    shop = ListShop("shop")
    for n in (10, 11, 13, 14):
        shop.put(sample_order(n, skus=["SKU-1"] if n != 14 else ["NOPE"]))
    cfg = make_config(tmp_path, pg_erp_url)
    svc = OrderImportService(cfg, {"shop": shop})
    try:
        svc.run_cycle()
        # An ERP order with an e-number no shop knows (typed in by hand, say).
        svc.writer_for("shop").write("shop", "999", sample_order(999, skus=["SKU-1"]))
    finally:
        svc.close()
    out = io.StringIO()
    args = argparse.Namespace(since=parse_time("1d"), shop=None)
    assert run_gaps(cfg, args, out, connectors={"shop": shop}) == 1
    text = out.getvalue()
    assert "missing e-numbers in series: 12" in text
    assert "in the shop but not in the ERP: 14 (failed)" in text
    assert "in the ERP but unknown to the shop: 999" in text


def test_end_to_end_through_woocommerce_emulator(tmp_path, pg_erp_url, capsys):
    emulators = pytest.importorskip("tests.emulators.woocommerce")
    from tests.emulators.orders import generate_orders, sample_skus

    eng = __import__("replicator.db", fromlist=["make_engine"]).make_engine(pg_erp_url, "test")
    with eng.begin() as c:
        for i, sku in enumerate(sample_skus(), start=1):
            c.exec_driver_sql(f"INSERT INTO items VALUES ('W-{i:04d}', '{sku}', 'Woo {i}', 1)")
    eng.dispose()
    now = datetime.now(UTC)
    orders = generate_orders(12, start=now - timedelta(hours=3), spacing=timedelta(minutes=10))
    with emulators.WooCommerceEmulator() as woo:
        woo.add_orders(orders)
        shops = (
            f'[[shops]]\nname = "woo"\nkind = "woocommerce"\nurl = "{woo.url}"\n'
            f'consumer_key = "{woo.consumer_key}"\nconsumer_secret = "{woo.consumer_secret}"\n'
        )
        cfg_path = _config_file(tmp_path, pg_erp_url, shops)
        code, out = _run(capsys, "download", "--config", str(cfg_path))
        assert code == 0, out
        expected = [o for o in orders if o.status == "processing" and o.paid is not None]
        assert f"total {len(orders)}, new {len(expected)}" in out
        assert "shop woo: ok" in out
        got = {r[0] for r in erp_rows(pg_erp_url, "SELECT e_number FROM order_header")}
        assert got == {str(o.number) for o in expected}
        # Downloading again imports nothing twice.
        code, out = _run(capsys, "download", "--config", str(cfg_path), "--since", "1d")
        assert code == 0 and "new 0" in out
        assert erp_count(pg_erp_url, "order_header") == len(expected)
