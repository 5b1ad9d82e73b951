"""Fixtures and helpers shared by the order-import tests (imported by the test_orders_* modules).

An ERP here is a real database with the sample ERP schema: a fresh PostgreSQL database from the
session cluster, or a uniquely named MariaDB database that is dropped afterwards.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
import sqlalchemy as sa

from replicator.config import Config, parse_config
from replicator.db import make_engine
from replicator.orders.coordinator import OrderImportService
from replicator.orders.sample import SAMPLE_MAPPING, ListShop, install_sample_erp


def _mariadb_db(mariadb_url: str) -> Iterator[str]:
    name = f"ord_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
    try:
        conn.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        yield f"{mariadb_url.rstrip('/')}/{name}"
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture(scope="session")
def _pg_erp_template(pg_server: Any) -> Iterator[str]:
    """The sample ERP installed once; each test gets a copy (CREATE DATABASE ... TEMPLATE)."""
    name = pg_server.createdb("erptmpl")
    install_sample_erp(pg_server.url(name))
    yield name
    pg_server.dropdb(name)


def _pg_copy(pg_server: Any, template: str) -> Iterator[str]:
    name = f"erp_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield pg_server.url(name)
    finally:
        pg_server.dropdb(name)


@pytest.fixture(params=["postgresql", "mariadb"])
def erp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A sample ERP on PostgreSQL and on MariaDB: the same test body runs against both."""
    if request.param == "postgresql":
        yield from _pg_copy(
            request.getfixturevalue("pg_server"), request.getfixturevalue("_pg_erp_template")
        )
        return
    gen = _mariadb_db(request.getfixturevalue("mariadb_url"))
    url = next(gen)
    install_sample_erp(url)
    yield url
    gen.close()


@pytest.fixture
def pg_erp_url(pg_server: Any, _pg_erp_template: str) -> Iterator[str]:
    yield from _pg_copy(pg_server, _pg_erp_template)


@pytest.fixture
def maria_erp_url(mariadb_url: str) -> Iterator[str]:
    gen = _mariadb_db(mariadb_url)
    url = next(gen)
    install_sample_erp(url)
    yield url
    gen.close()


def make_config(
    tmp_path: Path, erp_url: str, staging_url: str | None = None, **orders: Any
) -> Config:
    """A validated Config with the example mapping copied to ``tmp_path/mappings``."""
    (tmp_path / "mappings").mkdir(parents=True, exist_ok=True)
    target = tmp_path / "mappings" / "orders.toml"
    if not target.exists():
        shutil.copy(SAMPLE_MAPPING, target)
    data: dict[str, Any] = {
        "erp": {"dsn": erp_url},
        "capture": {"tables": ["public.order_header"]},
        "staging": {"url": staging_url or f"sqlite:///{tmp_path / 'staging.db'}"},
        "daemon": {"state_dir": str(tmp_path)},
        "orders": {
            "enabled": True,
            "backoff_initial": 0.0,
            "backoff_max": 0.0,
            "retry_attempts": 2,
            **orders,
        },
    }
    return parse_config(data, str(tmp_path / "config.toml"))


ServiceFactory = Callable[..., tuple[OrderImportService, ListShop]]


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Build an OrderImportService over a ListShop; everything built is closed afterwards."""
    made: list[OrderImportService] = []

    def build(
        erp_url: str, shop: ListShop | None = None, staging_url: str | None = None, **orders: Any
    ) -> tuple[OrderImportService, ListShop]:
        shop = shop or ListShop("shop")
        cfg = make_config(tmp_path, erp_url, staging_url, **orders)
        svc = OrderImportService(cfg, {shop.name: shop})
        made.append(svc)
        return svc, shop

    yield build
    for svc in made:
        svc.close()


def erp_rows(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = make_engine(url, "test")
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def erp_count(url: str, table: str) -> int:
    return int(erp_rows(url, f"SELECT count(*) FROM {table}")[0][0])
