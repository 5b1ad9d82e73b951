"""Property-based tests: generated orders (hostile strings, odd quantities, unknown SKUs, bad
e-mails) through the mapping and through the import into a real PostgreSQL ERP.

Properties: mapping either yields rows that fit the ERP columns or rejects the order with a
reason; an import either writes exactly one complete ERP order or nothing at all.
"""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.db import make_engine
from replicator.mappers.orders import (
    Lookups,
    OrderRejected,
    load_mapping,
    map_order,
    validate_mapping,
)
from replicator.orders.results import utcnow
from replicator.orders.sample import SAMPLE_MAPPING, sample_order
from tests import test_orders_support as support
from tests.test_orders_support import erp_rows

# Fixtures shared by the order tests (pytest finds them as module attributes).
pg_erp_url = support.pg_erp_url
_pg_erp_template = support._pg_erp_template
service_factory = support.service_factory

texts = st.text(max_size=60) | st.sampled_from(
    ["'; DROP TABLE order_line; --", "$(reboot)", "a\x00b", "Zoë 北京 🚀", "", "x" * 300]
)
quantities = st.one_of(
    st.integers(-3, 20_000),
    st.decimals(-5, 50, places=3, allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from(["two", "", None, "1e400", "NaN", True]),
)
skus = st.sampled_from(["SKU-1", "SKU-2", "SKU-3", "SKU-X7", "NOPE-9", "", None])


names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40) | st.sampled_from(
    ["'; DROP TABLE order_line; --", "$(reboot) `id` | & ;", "Zoë 北京 🚀", 'O\'Brien \\ "x"']
)


@st.composite
def orders(draw: Any) -> dict[str, Any]:
    """Half the orders are plausible (hostile names, sane numbers), half anything goes."""
    hostile = draw(st.booleans())
    t = texts if hostile else names
    o = sample_order(1, lines=1)
    o["billing"]["first_name"] = draw(t)
    o["billing"]["last_name"] = draw(t)
    o["shipping"]["address_1"] = draw(t)
    o["shipping"]["city"] = draw(t)
    o["customer_note"] = draw(t)
    if not hostile:
        o["billing"]["email"] = draw(st.emails() | st.just(""))
        o["line_items"] = [
            {
                "sku": draw(st.sampled_from(["SKU-1", "SKU-2", "SKU-X7"])),
                "name": draw(names),
                "quantity": draw(st.integers(1, 50)),
                "price": str(draw(st.decimals(0, 999, places=2))),
                "tax_class": "",
            }
            for _ in range(draw(st.integers(1, 6)))
        ]
        return o
    o["billing"]["email"] = draw(st.one_of(st.emails(), st.just(""), texts))
    o["currency"] = draw(st.sampled_from(["EUR", "dkk", "EURO", "", None]))
    o["total"] = draw(st.one_of(st.decimals(-10, 10**9, places=2, allow_nan=False).map(str), texts))
    o["payment_method"] = draw(st.sampled_from(["paypal", "bacs", "klarna", None]))
    n_lines = draw(st.integers(0, 6))
    o["line_items"] = [
        {
            "sku": draw(skus),
            "name": draw(texts),
            "quantity": draw(quantities),
            "price": draw(
                st.one_of(st.decimals(0, 10**6, places=2, allow_nan=False).map(str), texts)
            ),
            "tax_class": draw(st.sampled_from(["", "reduced-rate", "unknown-rate"])),
        }
        for _ in range(n_lines)
    ]
    return o


def _roundtrip(o: dict[str, Any]) -> Any:
    # What the importer sees: the bytes the shop sent, parsed with money as Decimal.
    return json.loads(json.dumps(o, default=str), parse_float=Decimal)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=orders())
def test_mapping_yields_fitting_rows_or_a_reason(pg_erp_url, order):
    global _mapping
    if _mapping is None:
        engine = make_engine(pg_erp_url, "test")
        _mapping = load_mapping(SAMPLE_MAPPING, "postgresql")
        validate_mapping(_mapping, engine)
        engine.dispose()
    m = _mapping
    items = {"SKU-1": "I-0001", "SKU-2": "I-0002", "SKU-3": "I-0003", "SKU-X7": "X-00007"}
    try:
        mapped = map_order(
            m, _roundtrip(order), shop="s", e_number="1", lookups=Lookups(m, items.get)
        )
    except OrderRejected as exc:
        assert exc.reason and exc.kind in ("mapping", "input")
        return
    assert mapped.lines and all(Decimal(0) < ln["quantity"] <= 10_000 for ln in mapped.lines)
    for table, row in [
        ("order_header", mapped.header),
        *(("order_line", ln) for ln in mapped.lines),
    ]:
        cols = m.schema[table]
        for col, value in row.items():
            info = cols[col]
            if isinstance(value, str):
                assert "\x00" not in value
                assert info.length is None or len(value) <= info.length
            if value is None:
                assert info.nullable or info.has_default


_mapping = None
_counter = itertools.count(50_000)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=orders())
def test_import_writes_one_complete_order_or_nothing(pg_erp_url, service_factory, order):
    global _svc
    if _svc is None or _svc[0] != pg_erp_url:
        _svc = (pg_erp_url, *service_factory(pg_erp_url))
    _, svc, shop = _svc
    e = str(next(_counter))
    order = {**order, "number": e, "id": int(e)}
    shop.put(order)
    svc.inbox.offer(shop._order(e), "poll", utcnow())
    entry = svc.importer.process("shop", e)
    headers = erp_rows(pg_erp_url, "SELECT order_no FROM order_header WHERE e_number = :e", e=e)
    if entry.state == "delivered":
        assert headers == [(entry.erp_order_no,)]
        lines = erp_rows(
            pg_erp_url, "SELECT count(*) FROM order_line WHERE order_no = :o", o=entry.erp_order_no
        )
        assert lines == [(len(order["line_items"]),)]
    else:
        assert entry.state == "failed" and entry.last_error
        assert headers == []
    orphans = erp_rows(
        pg_erp_url,
        "SELECT count(*) FROM order_line l WHERE NOT EXISTS "
        "(SELECT 1 FROM order_header h WHERE h.order_no = l.order_no)",
    )
    assert orphans == [(0,)]


_svc: tuple[Any, ...] | None = None
