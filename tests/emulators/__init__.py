"""Loopback emulators of the webshop APIs (WooCommerce REST v3, Magento 2 REST), for tests and
benchmarks: in-memory state a test can inspect, a request log, and fault switches.

Usage (from the repository root, so ``tests`` is importable)::

    from tests.emulators import WooCommerceEmulator, generate_orders

    with WooCommerceEmulator() as shop:          # 127.0.0.1, a free port, a background thread
        shop.add_orders(generate_orders(250, seed=1))
        connector = WooCommerceConnector("web", shop.url, shop.consumer_key, shop.consumer_secret)
        shop.throttle_next(1, retry_after=5)     # also fail/delay/truncate/garbage_next
        ...
        shop.count("GET", "/wp-json/wc/v3/orders"), shop.stock(), shop.notes
"""

from .base import ShopEmulator
from .magento import MagentoEmulator
from .orders import SampleOrder, generate_orders, generate_products, modified
from .woocommerce import WooCommerceEmulator

__all__ = [
    "MagentoEmulator",
    "SampleOrder",
    "ShopEmulator",
    "WooCommerceEmulator",
    "generate_orders",
    "generate_products",
    "modified",
]
