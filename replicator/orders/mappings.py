"""Which writer a mapping gets, and checking every mapping in use against the live ERP.

Both mapping formats (:mod:`replicator.mappers.orders` for schemas shaped after the mapping,
:mod:`replicator.mappers.plan` for real ERPs) are loaded and validated here the same way for the
daemon's start-up and for ``check-config --connect``, so both print the same messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from replicator.errors import ConfigError
from replicator.mappers.orders import OrderMapping
from replicator.mappers.plan import PlanMapping, load_any, validate_any
from replicator.orders.plan_writer import PlanWriter
from replicator.orders.writer import ErpWriter, ensure_e_number_index

AnyMapping = OrderMapping | PlanMapping


class MappingUnfit(ConfigError):
    """The mapping file is well-formed but the live ERP does not fit it (a table or column is
    missing, a type changed): the order import waits, not ready; the rest of the daemon runs."""


AnyWriter = ErpWriter | PlanWriter


def make_writer(engine: sa.Engine, mapping: AnyMapping, *, create_index: bool) -> AnyWriter:
    """The writer for a validated mapping; creates what sync-daemon owns in the ERP (the link
    table of a plan mapping; the e-number index of the first format when configured)."""
    if isinstance(mapping, PlanMapping):
        writer = PlanWriter(engine, mapping)
        writer.prepare()
        return writer
    if create_index:
        ensure_e_number_index(engine, mapping)
    return ErpWriter(engine, mapping)


def load_checked(path: str | Path, dialect: str, engine: sa.Engine) -> AnyMapping:
    """Load and validate one mapping file (raises ConfigError listing every problem)."""
    mapping = load_any(path, dialect)
    validate_any(mapping, engine)
    return mapping


def check_mappings(cfg: Any, engine: sa.Engine) -> Iterator[str]:
    """``check-config --connect``: every shop's mapping against the live ERP, nothing written."""
    shops = sorted({s.name for s in getattr(cfg, "shops", ())}) or ["default"]
    seen: set[str] = set()
    for shop in shops:
        path = str(cfg.resolve_path(cfg.orders.mapping_for(shop)))
        if path in seen:
            continue
        seen.add(path)
        m = load_checked(path, cfg.erp.dialect, engine)
        if isinstance(m, PlanMapping):
            yield (
                f"mapping {path}: OK (plan: {len(m.steps())} row steps, "
                f"{len(m.lookups)} lookups, link table {m.link_table})"
            )
        else:
            yield f"mapping {path}: OK ({m.header_table} + {m.lines_table})"
