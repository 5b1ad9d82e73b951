"""Config sections of the order import: ``[[shops]]`` and ``[orders]`` (owned by order import)."""

from __future__ import annotations

from replicator.config.core import Section


class ShopSection(Section):
    """``[[shops]]``: one webshop connector."""

    name: str
    kind: str


class OrdersSection(Section):
    """``[orders]``: order import settings."""

    enabled: bool = False
