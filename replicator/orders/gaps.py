"""E-number gaps: what a shop owner asks when the ERP and the shop disagree.

Three lists per shop:

* ``missing_numbers`` — holes in the shop's numeric e-number series (orders the shop numbered
  but that never reached us, e.g. a deleted order or a lost webhook before polling caught up);
* ``not_in_erp`` — orders the shop has (downloaded, or fetched now) that have no ERP order;
* ``unknown_to_shop`` — ERP orders carrying an e-number the shop does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from replicator.connectors.base import ShopConnector
from replicator.orders.ledger import Ledger
from replicator.orders.writer import ErpWriter

log = structlog.get_logger(__name__)

MAX_LISTED = 1000
MAX_SHOP_LOOKUPS = 50


@dataclass
class GapReport:
    shop: str
    missing_numbers: list[int] = field(default_factory=list)
    not_in_erp: list[tuple[str, str]] = field(default_factory=list)  # (e-number, ledger state)
    unknown_to_shop: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing_numbers or self.not_in_erp or self.unknown_to_shop)


def missing_in_series(numbers: list[int]) -> list[int]:
    """Holes between the smallest and largest number (at most MAX_LISTED)."""
    if not numbers:
        return []
    have = set(numbers)
    out = []
    for n in range(min(have), max(have) + 1):
        if n not in have:
            out.append(n)
            if len(out) >= MAX_LISTED:
                break
    return out


def find_gaps(
    shop: str,
    ledger: Ledger,
    writer: ErpWriter,
    since: datetime | None,
    connector: ShopConnector | None = None,
    other_shops_e_numbers: set[str] | None = None,
) -> GapReport:
    """Compare the shop's e-numbers (ledger, plus a live fetch when a connector is given) with
    the ERP's e-number column."""
    rep = GapReport(shop)
    known = {e: state for e, state, _ in ledger.e_numbers(shop, since)}
    all_known = {e for e, _, _ in ledger.e_numbers(shop, None)}
    if connector is not None and since is not None:
        for order in connector.fetch_orders(since.replace(tzinfo=UTC)):
            known.setdefault(order.e_number, "not downloaded")
            all_known.add(order.e_number)
    erp = writer.erp_e_numbers()
    rep.missing_numbers = missing_in_series([int(e) for e in known if e.isdigit()])
    rep.not_in_erp = sorted(
        ((e, s) for e, s in known.items() if e not in erp and s != "skipped"),
        key=lambda x: (len(x[0]), x[0]),
    )[:MAX_LISTED]
    candidates = sorted(
        erp - all_known - (other_shops_e_numbers or set()), key=lambda x: (len(x), x)
    )
    lookups = 0
    for e in candidates:
        # Ask the shop itself before claiming it does not know the order (bounded: each is a call).
        if connector is not None and lookups < MAX_SHOP_LOOKUPS:
            lookups += 1
            try:
                if connector.fetch_order(e) is not None:
                    continue
            except NotImplementedError:
                lookups = MAX_SHOP_LOOKUPS
        rep.unknown_to_shop.append(e)
        if len(rep.unknown_to_shop) >= MAX_LISTED:
            break
    return rep
