"""What a plan reads from the ERP's master data: ``lookup(table, column, filter, value, ...)``
in expressions, and the cache of those reads (and of the numbering setup) for
``lookup_cache_seconds``.

Misses are not cached: master data may appear at any moment, and the order that needs it is
parked until then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from replicator.mappers import expr as ex
from replicator.mappers.expr import short_repr
from replicator.mappers.orders import coerce_to_column
from replicator.mappers.plan import PlanMapping
from replicator.orders.plan.erp_sql import ErpSql


class ReadCache:
    """Values read from the ERP, each kept for the plan's ``lookup_cache_seconds``."""

    def __init__(self, plan: PlanMapping) -> None:
        self.m = plan
        self._cache: dict[tuple[Any, ...], tuple[float, Any]] = {}

    def get(self, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
        """The cached value under ``key``, or what ``load`` reads now (kept unless None)."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.m.lookup_cache_seconds:
            return hit[1]
        value = load()
        if value is not None:  # misses are not cached: master data may appear any moment
            self._cache[key] = (now, value)
        return value


class ErpLookups:
    """The ``lookup`` function of a plan's expressions: one column of the one row matching."""

    def __init__(self, sql: ErpSql, plan: PlanMapping, cache: ReadCache) -> None:
        self.sql = sql
        self.m = plan
        self.cache = cache

    def lookup(self, conn: sa.Connection, table: str, column: str, pairs: tuple[Any, ...]) -> Any:
        """``column`` of the row of ``table`` where each (column, value) of ``pairs`` matches;
        :class:`~replicator.mappers.expr.LookupFailed` when there is none or more than one."""
        q = self.sql.q
        cols = pairs[0::2]
        info = self.m.schema.get(table, {})
        values = tuple(
            coerce_to_column(v, info.get(str(c)), f"lookup({table})", str(c))
            for c, v in zip(cols, pairs[1::2], strict=True)
        )
        where = " AND ".join(f"{q(str(c))} = :v{i}" for i, c in enumerate(cols))
        shown = " and ".join(f"{c} = {short_repr(v)}" for c, v in zip(cols, values, strict=True))

        def load() -> Any:
            rows = self.sql.run(
                conn,
                f"SELECT {q(column)} FROM {self.sql.table(table)} WHERE {where} LIMIT 2",
                {f"v{i}": v for i, v in enumerate(values)},
            ).all()
            if len(rows) > 1:
                raise ex.LookupFailed(f"lookup: several rows in {table} where {shown} (need one)")
            return rows[0][0] if rows else None

        found = self.cache.get(("lookup", table, column, *cols, *values), load)
        if found is None:
            raise ex.LookupFailed(f"lookup: no row in {table} where {shown}")
        return found
