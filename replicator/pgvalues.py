"""PostgreSQL values Python cannot hold: kept as PostgreSQL's text instead of stopping capture.

A date or timestamp of ``infinity`` / ``-infinity``, a BC date, a year past 9999 and the time
``24:00:00`` are valid PostgreSQL values with no ``datetime`` equivalent; psycopg's loaders
raise ``DataError`` for them. ERPs use them (``valid_until = 'infinity'``), and one such row
would stop the initial copy or the stream for good. So the text loaders of the temporal types
are wrapped: a value the standard loader refuses comes back as PostgreSQL's own text. Staging
stores that text (SQLite keeps temporal values as text anyway; PostgreSQL staging parses it
back into the same value), which is also what trigger capture does with such values
(:mod:`replicator.cdc.triggers.decode`). Every other value goes through the standard loader
unchanged.

:func:`register` is called once, when :mod:`replicator.db` is imported, on psycopg's global
adapters map, so every connection the daemon makes (replication, copies, chunks, the order
import's ERP reads) loads them the same way.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import abc, postgres, pq
from psycopg.adapt import AdaptersMap, Loader

TEMPORAL_TYPES = ("date", "time", "timetz", "timestamp", "timestamptz")


def _lenient(base: type[abc.Loader]) -> type[Loader]:
    class LenientLoader(Loader):
        """The standard loader, or the value's text where that loader refuses it."""

        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._load = base(oid, context).load

        def load(self, data: Any) -> Any:
            try:
                return self._load(data)
            except psycopg.DataError:
                return bytes(data).decode()

    LenientLoader.__name__ = LenientLoader.__qualname__ = f"Lenient{base.__name__}"
    return LenientLoader


def register(adapters: AdaptersMap) -> None:
    """Wrap the text loaders of the temporal types in ``adapters`` (idempotent)."""
    for name in TEMPORAL_TYPES:
        oid = postgres.types[name].oid
        base = adapters.get_loader(oid, pq.Format.TEXT)
        if base is None or base.__name__.startswith("Lenient"):
            continue
        adapters.register_loader(oid, _lenient(base))
