"""The order mappings in use: load, validate against the live ERP, hot-reload; which writer each
gets.

Both mapping formats (:mod:`replicator.mappers.orders` for schemas shaped after the mapping,
:mod:`replicator.mappers.plan` for real ERPs) are loaded and validated here the same way for the
daemon's start-up and for ``check-config --connect``, so both print the same messages.

:class:`MappingStore` holds the mapping of every shop for the order import: a changed file is
reloaded and re-validated before the next order, a bad edit keeps the last good mapping, and a
mapping the ERP no longer fits (e.g. after an ERP upgrade) makes the import not ready until a
re-validation passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from replicator.errors import ConfigError
from replicator.mappers.orders import OrderMapping
from replicator.mappers.plan import PlanMapping, load_any, validate_any
from replicator.orders.plan_writer import PlanWriter
from replicator.orders.writer import ErpUnavailable, ErpWriter, db_message, ensure_e_number_index

log = structlog.get_logger(__name__)

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


class LoadedMapping:
    """A validated mapping, its writer, and the file's mtime when it was loaded."""

    def __init__(self, mapping: AnyMapping, writer: AnyWriter, mtime: float) -> None:
        self.mapping = mapping
        self.writer = writer
        self.mtime = mtime


class MappingStore:
    """Every shop's mapping for the order import, reloaded when its file changes."""

    def __init__(self, cfg: Any, engine: sa.Engine) -> None:
        self.cfg = cfg
        self.engine = engine
        self._mappings: dict[str, LoadedMapping] = {}
        # Mapping path -> why it no longer fits the ERP (schema changed under it): the order
        # service is not ready until a re-validation passes; capture and the rest go on.
        self._unfit: dict[str, str] = {}
        self._refit: set[str] = set()  # fits again: its parked orders are retried once

    def check_all(self, shops: Iterable[str]) -> None:
        """Validate every mapping in use at start-up: a bad mapping is a configuration error."""
        for shop in sorted(shops) or ["default"]:
            try:
                self.get(shop)
            except ErpUnavailable as exc:
                # Start anyway: the first cycle checks the mapping once the ERP answers (and
                # counts as failed until it does). A malformed mapping still stops the start-up.
                log.warning("order_import_erp_unavailable", shop=shop, error=str(exc))
            except MappingUnfit as exc:
                # Start anyway, not ready (/readyz says why); every cycle checks again.
                log.error("mapping_does_not_fit_erp", shop=shop, error=str(exc))

    def path(self, shop: str) -> Path:
        return Path(self.cfg.resolve_path(self.cfg.orders.mapping_for(shop)))

    def get(self, shop: str) -> LoadedMapping:
        """The shop's mapping; reloaded (and re-validated) when the file changed."""
        path = self.path(shop)
        key = str(path)
        loaded = self._mappings.get(key)
        try:
            mtime = path.stat().st_mtime
        except OSError as exc:
            if loaded is not None:
                return loaded
            raise ConfigError(f"{path}: cannot read mapping file: {exc.strerror}") from None
        unfit = key in self._unfit
        if loaded is not None and loaded.mtime == mtime and not unfit:
            return loaded
        try:
            m = load_any(path, self.cfg.erp.dialect)  # a malformed file stops the start-up
            if loaded is not None and m.hash == loaded.mapping.hash and not unfit:
                loaded.mtime = mtime
                return loaded
            try:
                validate_any(m, self.engine)
            except ConfigError as exc:
                if loaded is None:
                    # The ERP does not fit the mapping (e.g. after an ERP upgrade): the order
                    # import is not ready and orders wait in the inbox; capture goes on.
                    self._unfit[key] = str(exc)
                    raise MappingUnfit(str(exc)) from None
                raise
            writer = make_writer(self.engine, m, create_index=self.cfg.orders.create_e_number_index)
        except sa.exc.DBAPIError as exc:
            # The ERP is unreachable right now: a transient condition, not a bad mapping.
            if loaded is None:
                raise ErpUnavailable(
                    f"cannot check the mapping against the ERP: {db_message(exc)}"
                ) from None
            log.warning("mapping_check_deferred", path=key, error=db_message(exc))
            return loaded
        except ConfigError as exc:
            if loaded is None:
                raise
            # Keep importing with the last good mapping; the operator sees why in the log.
            log.error("mapping_reload_failed", path=key, error=str(exc))
            loaded.mtime = mtime
            if unfit:
                # The ERP changed under the mapping: /readyz shows start-up's messages.
                self._unfit[key] = str(exc)
            return loaded
        if unfit:
            log.info("mapping_fits_again", path=key)
            self._unfit.pop(key, None)
            self._refit.add(key)
        new = LoadedMapping(m, writer, mtime)
        if loaded is not None:
            log.info("mapping_reloaded", path=key, hash=m.hash[:12])
        self._mappings[key] = new
        return new

    def writer_for(self, shop: str) -> AnyWriter:
        return self.get(shop).writer

    def mark_unfit(self, path: str, why: str) -> None:
        """A write met a schema the mapping does not fit: re-validate it before the next use."""
        self._unfit.setdefault(path, why)

    def refitted(self, shop: str) -> bool:
        """The shop's mapping fitted the ERP again: every order parked for a mapping problem is
        retried (once; :meth:`refit_done` when they are requeued)."""
        return str(self.path(shop)) in self._refit

    def refit_done(self, shop: str) -> None:
        self._refit.discard(str(self.path(shop)))

    def readiness(self) -> tuple[bool, str]:
        """For ``/readyz``: not ready while a mapping no longer fits the ERP."""
        if not self._unfit:
            return True, "mappings fit the ERP"
        return False, "; ".join(f"{p}: {why}" for p, why in sorted(self._unfit.items()))
