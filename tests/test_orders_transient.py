"""Transient versus permanent failures, classified on real driver errors (PostgreSQL lock timeout,
MariaDB lock wait timeout) and a shop answering 429 with Retry-After."""

from __future__ import annotations

import pymysql
import sqlalchemy as sa

from replicator.connectors.base import ShopUnavailable
from replicator.db import make_engine
from replicator.errors_map import is_retryable
from replicator.orders.sample import sample_order
from tests import test_orders_support as support

# Fixtures shared by the order tests (pytest finds them as module attributes).
pg_erp_url = support.pg_erp_url
_pg_erp_template = support._pg_erp_template
maria_erp_url = support.maria_erp_url
service_factory = support.service_factory


def _lock_error(url: str, set_timeout: str) -> sa.exc.DBAPIError:
    engine = make_engine(url, "test")
    holder = engine.connect()
    waiter = engine.connect()
    try:
        holder.begin()
        holder.exec_driver_sql(
            "SELECT next_value FROM number_series WHERE series = 'ORDER' FOR UPDATE"
        )
        waiter.begin()
        waiter.exec_driver_sql(set_timeout)
        try:
            waiter.exec_driver_sql("UPDATE number_series SET next_value = 1 WHERE series = 'ORDER'")
        except sa.exc.DBAPIError as exc:
            return exc
        raise AssertionError("no lock timeout")
    finally:
        waiter.close()
        holder.close()
        engine.dispose()


def test_lock_timeouts_are_transient_on_both_erps(pg_erp_url, maria_erp_url):
    pg = _lock_error(pg_erp_url, "SET lock_timeout = '100ms'")
    assert is_retryable(pg)
    maria = _lock_error(maria_erp_url, "SET SESSION innodb_lock_wait_timeout = 1")
    assert isinstance(maria.orig, pymysql.err.OperationalError) and maria.orig.args[0] == 1205
    assert is_retryable(maria)


def test_integrity_and_data_errors_are_permanent(pg_erp_url):
    engine = make_engine(pg_erp_url, "test")
    try:
        with engine.connect() as conn:
            try:
                conn.exec_driver_sql("INSERT INTO items VALUES ('I-0001', 'dup', 'x', 1)")
            except sa.exc.IntegrityError as exc:
                assert not is_retryable(exc)
            conn.rollback()
            try:
                conn.exec_driver_sql("SELECT 'abc'::numeric")
            except sa.exc.DataError as exc:
                assert not is_retryable(exc)
    finally:
        engine.dispose()


def test_shop_429_retry_after_is_honoured_then_cycle_succeeds(pg_erp_url, service_factory):
    slept: list[float] = []
    svc, shop = service_factory(pg_erp_url, backoff_max=5.0, retry_attempts=3)
    svc.retries.sleep = slept.append  # the retry loop's clock; recorded instead of waiting
    shop.put(sample_order(1))
    shop.failures = [
        ShopUnavailable("429 Too Many Requests", retry_after=2.0),
        ShopUnavailable("503 Service Unavailable"),
    ]
    r = svc.run_cycle()
    assert r.ok and r.new == 1
    assert shop.fetches >= 3
    assert slept[0] >= 2.0  # never sooner than the shop asked


def test_retry_after_beyond_backoff_ceiling_fails_the_cycle_without_blocking(
    pg_erp_url, service_factory
):
    slept: list[float] = []
    svc, shop = service_factory(pg_erp_url, backoff_max=5.0, retry_attempts=3)
    svc.retries.sleep = slept.append
    shop.failures = [ShopUnavailable("429 Too Many Requests", retry_after=3600)]
    r = svc.run_cycle()
    assert not r.ok and "429" in r.shops["shop"]
    assert slept == []
    assert svc.ledger.shop_state("shop").consecutive_failures == 1


def test_service_starts_with_erp_down_or_unfit_mapping_and_bad_mapping_stops_start(
    tmp_path, pg_erp_url
):
    import pytest

    from replicator.errors import ConfigError
    from replicator.localpg import free_port
    from replicator.orders.coordinator import OrderImportService
    from replicator.orders.sample import ListShop
    from tests.test_orders_support import make_config

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/erp"
    shop = ListShop("shop")
    shop.put(sample_order(1))
    svc = OrderImportService(make_config(tmp_path / "a", dead), {"shop": shop})
    try:
        r = svc.run_cycle()
        assert not r.ok and "cannot check the mapping against the ERP" in r.shops["shop"]
        assert svc.ledger.shop_state("shop").consecutive_failures == 1
    finally:
        svc.close()

    cfg = make_config(tmp_path / "b", pg_erp_url)
    m = tmp_path / "b" / "mappings" / "orders.toml"
    m.write_text(m.read_text().replace('table = "order_line"', 'table = "order_lines"'))
    # The ERP does not fit the mapping: the service starts not ready (capture goes on in the
    # daemon), the orders wait, every cycle checks again and says why.
    svc = OrderImportService(cfg, {"shop": shop})
    try:
        ok, detail = svc.readiness()
        assert not ok and "lines.table: table 'order_lines' does not exist" in detail
        r = svc.run_cycle()
        assert not r.ok and "table 'order_lines' does not exist" in r.shops["shop"]
    finally:
        svc.close()
    # A malformed mapping file still stops the start-up.
    m.write_text(m.read_text() + "\n[nonsense]\n")
    with pytest.raises(ConfigError, match=r"nonsense: unknown key"):
        OrderImportService(make_config(tmp_path / "b", pg_erp_url), {"shop": shop})
