"""``[[shops]]`` sections: secrets from the file, the environment or a credentials file, kind
requirements, and error messages that never echo a secret; the connector factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from replicator.config import parse_config
from replicator.config.shops import ShopSection
from replicator.connectors import (
    WebhookOnlyConnector,
    make_connector,
    make_connectors,
    make_webhook_receiver,
)
from replicator.connectors.inbox import InboxConnector
from replicator.connectors.magento import MagentoConnector
from replicator.connectors.shopify import ShopifyConnector, ShopifyWebhookReceiver
from replicator.connectors.shopware import ShopwareConnector, ShopwareWebhookReceiver
from replicator.connectors.webhook import MemoryWebhookStore
from replicator.connectors.woocommerce import WooCommerceConnector
from replicator.errors import ConfigError
from tests.emulators import WooCommerceEmulator

BASE: dict[str, Any] = {"erp": {"dsn": "postgresql://u@h/db"}, "capture": {"tables": ["t"]}}
KEY, SECRET = "ck_live_SUPERSECRETKEY1", "cs_live_SUPERSECRETVAL2"


def load(*shops: dict[str, Any]) -> tuple[ShopSection, ...]:
    return parse_config({**BASE, "shops": list(shops)}).shops


def test_secrets_from_env_and_credentials_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOP_CK", KEY)
    (tmp_path / "shop_cs").write_text(SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    [shop] = load(
        {
            "name": "web",
            "kind": "woocommerce",
            "url": "https://shop.example/",
            "consumer_key_env": "SHOP_CK",
            "consumer_secret_file": "shop_cs",
        }
    )
    assert shop.secret("consumer_key") == KEY and shop.secret("consumer_secret") == SECRET
    assert shop.url == "https://shop.example"
    assert KEY not in repr(shop) and SECRET not in repr(shop)


@pytest.mark.parametrize(
    ("shop", "expect"),
    [
        ({"consumer_key": KEY}, "needs consumer_secret"),
        (
            {"consumer_key": KEY, "consumer_secret": SECRET, "consumer_secret_env": "X"},
            "not both|also named",
        ),
        ({"consumer_key_env": "NOT_SET_ANYWHERE", "consumer_secret": SECRET}, "NOT_SET_ANYWHERE"),
        ({"consumer_key": KEY, "consumer_secret": SECRET, "per_page": 500}, "per_page"),
        (
            {"consumer_key": KEY, "consumer_secret": SECRET, "url": f"https://u:{SECRET}@x"},
            "credentials",
        ),
    ],
)
def test_errors_name_the_problem_but_never_the_secret(shop: dict[str, Any], expect: str) -> None:
    section = {"name": "web", "kind": "woocommerce", "url": "https://shop.example", **shop}
    with pytest.raises(ConfigError, match=expect) as info:
        load(section)
    assert KEY not in str(info.value) and SECRET not in str(info.value)


def test_kind_requirements() -> None:
    with pytest.raises(ConfigError, match="needs url, token"):
        load({"name": "m", "kind": "magento"})
    with pytest.raises(ConfigError, match="needs inbox_dir"):
        load({"name": "i", "kind": "inbox"})
    with pytest.raises(ConfigError, match="needs webhook_secret"):
        load({"name": "h", "kind": "webhook"})
    with pytest.raises(ConfigError, match="needs url, token"):
        load({"name": "x", "kind": "shopify"})
    with pytest.raises(ConfigError, match="needs client_secret"):
        load({"name": "s", "kind": "shopware", "url": "https://sw.example", "client_id": KEY})
    with pytest.raises(ConfigError, match="kind"):
        load({"name": "x", "kind": "prestashop"})
    with pytest.raises(ConfigError, match="api_version"):
        load(
            {
                "name": "x",
                "kind": "shopify",
                "url": "https://s.example",
                "token": "t",
                "api_version": "latest",
            }
        )


def test_shopify_and_shopware_kinds_build_their_connector_and_receiver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SW_SECRET", SECRET)
    sfy, sw = load(
        {
            "name": "sfy",
            "kind": "shopify",
            "url": "https://s.example",
            "token": "shpat_x",
            "webhook_secret": "client-secret",
            "api_version": "2026-01",
            "e_number_field": "id",
            "location_id": "70001",
            "invoice_target": "note",
        },
        {
            "name": "sw",
            "kind": "shopware",
            "url": "https://sw.example",
            "client_id": KEY,
            "client_secret_env": "SW_SECRET",
            "webhook_secret": "shop-secret",
        },
    )
    assert SECRET not in repr(sw)
    a, b = make_connector(sfy), make_connector(sw)
    try:
        assert isinstance(a, ShopifyConnector) and a.api_version == "2026-01"
        assert a.e_number_field == "id" and a.invoice_target == "note"
        assert isinstance(b, ShopwareConnector) and b.name == "sw"
    finally:
        a.close()
        b.close()
    ra = make_webhook_receiver(sfy, MemoryWebhookStore())
    rb = make_webhook_receiver(sw, MemoryWebhookStore())
    assert isinstance(ra, ShopifyWebhookReceiver) and ra.e_number_field == "id"
    assert isinstance(rb, ShopwareWebhookReceiver)


def test_make_connector_builds_each_kind(tmp_path: Path) -> None:
    woo, mage, inbox, hook = load(
        {
            "name": "w",
            "kind": "woocommerce",
            "url": "http://127.0.0.1:9",
            "consumer_key": KEY,
            "consumer_secret": SECRET,
        },
        {
            "name": "m",
            "kind": "magento",
            "url": "http://127.0.0.1:9",
            "token": "tok",
            "source_code": "dk",
        },
        {"name": "i", "kind": "inbox", "inbox_dir": "drop", "inbox_settle": 0.5},
        {"name": "h", "kind": "webhook", "webhook_secret": "whs"},
    )
    built = [
        make_connector(woo),
        make_connector(mage),
        make_connector(inbox, base_dir=tmp_path),
        make_connector(hook),
    ]
    try:
        assert isinstance(built[0], WooCommerceConnector) and built[0].name == "w"
        assert isinstance(built[1], MagentoConnector) and built[1].source_code == "dk"
        assert isinstance(built[2], InboxConnector) and built[2].directory == tmp_path / "drop"
        assert (tmp_path / "drop" / "processed").is_dir()
        assert isinstance(built[3], WebhookOnlyConnector)
        assert list(built[3].fetch_orders(__import__("datetime").datetime.now())) == []
        receiver = make_webhook_receiver(hook, MemoryWebhookStore())
        assert receiver.shop == "h" and receiver.max_body == hook.max_body
    finally:
        for c in built:
            c.close()


def test_factory_connector_talks_to_the_shop() -> None:
    with WooCommerceEmulator() as emu:
        [shop] = load(
            {
                "name": "w",
                "kind": "webhook",
                "webhook_secret": "whs",
                "url": emu.url,
                "consumer_key": emu.consumer_key,
                "consumer_secret": emu.consumer_secret,
            }
        )
        conn = make_connector(shop)
        try:
            stock = dict((u.sku, u.quantity) for u in conn.fetch_stock())
            assert stock == emu.stock()
            assert emu.requests and all(r.status == 200 for r in emu.requests)
        finally:
            conn.close()


def test_one_connector_set_for_the_daemon_and_the_cli(tmp_path: Path) -> None:
    """make_connectors: every shop with something to reach; a webhook-only shop has none (its
    orders arrive by webhook; the import works off its inbox), a webhook shop with REST has one."""
    cfg = parse_config(
        {
            **BASE,
            "shops": [
                {
                    "name": "woo",
                    "kind": "woocommerce",
                    "url": "https://w.example",
                    "consumer_key": KEY,
                    "consumer_secret": SECRET,
                },
                {"name": "hooks", "kind": "webhook", "webhook_secret": "s"},
                {
                    "name": "hooks-rest",
                    "kind": "webhook",
                    "webhook_secret": "s",
                    "url": "https://h.example",
                    "consumer_key": KEY,
                    "consumer_secret": SECRET,
                },
                {"name": "files", "kind": "inbox", "inbox_dir": "drop"},
            ],
        },
        str(tmp_path / "config.toml"),
    )
    connectors = make_connectors(cfg)
    try:
        assert sorted(connectors) == ["files", "hooks-rest", "woo"]
        assert isinstance(connectors["hooks-rest"], WooCommerceConnector)
        files = connectors["files"]
        assert isinstance(files, InboxConnector)
    finally:
        for c in connectors.values():
            c.close()
