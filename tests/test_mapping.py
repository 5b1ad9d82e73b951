"""Mapping files: loading, the safe expression evaluator, validation against the live ERP schema
(PostgreSQL and MariaDB), identifier injection, and mapping orders into rows."""

from __future__ import annotations

import argparse
import io
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.commands.orders import run_map
from replicator.db import make_engine
from replicator.errors import ConfigError
from replicator.mappers import expr as ex
from replicator.mappers.orders import (
    Lookups,
    OrderRejected,
    load_mapping,
    map_order,
    qident,
    validate_mapping,
)
from replicator.orders.sample import SAMPLE_MAPPING, sample_order
from tests import test_orders_support as support
from tests.test_orders_support import make_config

# Fixtures shared by the order tests (pytest finds them as module attributes).
erp_url = support.erp_url
_pg_erp_template = support._pg_erp_template
pg_erp_url = support.pg_erp_url

NAMES = frozenset({"order", "line"})


def _eval(source: str, **ctx):
    return ex.parse(source, NAMES).evaluate(ctx, {})


def test_expressions_evaluate_over_order_json():
    order = {
        "billing": {"first_name": "Ann", "last_name": "Lee"},
        "lines": [{"q": 2}],
        "total": "9.5",
    }
    assert (
        _eval("concat(order.billing.first_name, ' ', order.billing.last_name)", order=order)
        == "Ann Lee"
    )
    assert _eval("decimal(order.total) * 2", order=order) == Decimal("19.0")
    assert _eval("order.lines[0].q + 1", order=order) == 3
    assert _eval("order.missing.deeper", order=order) is None
    assert _eval("'a' if order.lines else 'b'", order=order) == "a"
    assert _eval("coalesce(order.nope, order['total'])", order=order) == "9.5"
    assert _eval("get(order, 'billing.last_name')", order=order) == "Lee"


@pytest.mark.parametrize(
    "source",
    [
        "__import__('os').system('id')",
        "order.__class__",
        "order.keys()",
        "(lambda: 1)()",
        "[x for x in order]",
        "open('/etc/passwd')",
        "eval('1')",
        "unknown_name",
        "2 ** 1000000",
        "'x' * 100000000",
        "order.a := 1",
        "f'{order}'",
    ],
)
def test_unsafe_expressions_are_rejected(source):
    with pytest.raises(ex.ExprError):
        e = ex.parse(source, NAMES)
        e.evaluate({"order": {}}, {})


def test_example_mapping_validates_against_sample_erp(erp_url):
    engine = make_engine(erp_url, "test")
    try:
        dialect = "postgresql" if erp_url.startswith("postgresql") else "mysql"
        m = load_mapping(SAMPLE_MAPPING, dialect)
        validate_mapping(m, engine)
        assert m.schema["order_header"]["total"].kind == "decimal"
        assert m.schema["order_header"]["posted"].kind == "bool"
    finally:
        engine.dispose()


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    text = SAMPLE_MAPPING.read_text()
    assert old in text, old
    p = tmp_path / "m.toml"
    p.write_text(text.replace(old, new, 1))
    return p


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'table = "order_header"',
            'table = "order_header; DROP TABLE customers"',
            "header.table: 'order_header; DROP TABLE customers' is not a plain name",
        ),
        (
            'e_number_column = "e_number"',
            'e_number_column = "e_number\\" --"',
            "header.e_number_column: 'e_number\" --' is not a plain name",
        ),
        (
            'note = "order.customer_note"',
            '"note; drop" = "order.customer_note"',
            "header.columns.note; drop: 'note; drop' is not a plain column name",
        ),
        (
            'note = "order.customer_note"',
            "note = \"__import__('os')\"",
            "header.columns.note: '__import__' is not a known function",
        ),
        (
            'note = "order.customer_note"',
            'note = "order.customer_note +"',
            "header.columns.note: invalid expression",
        ),
    ],
)
def test_load_rejects_injection_and_bad_expressions(tmp_path, old, new, message):
    p = _variant(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_mapping(p, "postgresql")
    assert f"{p}: {message}" in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'table = "order_line"',
            'table = "order_lines"',
            "lines.table: table 'order_lines' does not exist in the ERP",
        ),
        (
            'note = "order.customer_note"',
            'notes = "order.customer_note"',
            "header.columns.notes: column 'notes' does not exist in table 'order_header'",
        ),
        ("status = \"'open'\"", "status = 12", None),
        (
            'total = "decimal(order.total)"',
            "total = \"'many'\"",
            "header.columns.total: yields str but order_header.total is NUMERIC",
        ),
        (
            'currency = "upper(order.currency)"',
            "",
            "order_header: column 'currency' is NOT NULL without default and nothing maps it",
        ),
        ('key = "ORDER"', 'key = "NOPE"', "header.number_series.key: no row 'NOPE'"),
    ],
)
def test_validation_against_live_schema_names_file_and_key(tmp_path, pg_erp_url, old, new, message):
    p = _variant(tmp_path, old, new)
    engine = make_engine(pg_erp_url, "test")
    try:
        m = load_mapping(p, "postgresql")
        if message is None:
            validate_mapping(m, engine)  # an int constant into a varchar column is fine
            return
        with pytest.raises(ConfigError) as info:
            validate_mapping(m, engine)
        assert f"{p}: {message}" in str(info.value)
    finally:
        engine.dispose()


def test_identifiers_are_quoted_for_the_dialect():
    assert qident("order", "postgresql") == '"order"'
    assert qident("order", "mysql") == "`order`"
    with pytest.raises(ValueError):
        qident('x" OR 1=1 --', "postgresql")


def _mapping(pg_erp_url):
    engine = make_engine(pg_erp_url, "test")
    m = load_mapping(SAMPLE_MAPPING, "postgresql")
    validate_mapping(m, engine)
    engine.dispose()
    return m


def test_map_order_rows_and_lookup_failures(pg_erp_url):
    m = _mapping(pg_erp_url)
    items = {"SKU-1": "I-0001"}
    lk = Lookups(m, items.get)
    mapped = map_order(
        m,
        json.loads(json.dumps(sample_order(1, skus=["SKU-1"]))),
        shop="s",
        e_number="1",
        lookups=lk,
    )
    assert mapped.header["e_number"] == "1"
    assert mapped.header["shipping_method"] == "DHL" and mapped.header["payment_method"] == "PAYPAL"
    assert mapped.header["ship_country"] == "DE" and mapped.header["total"] == Decimal("14.40")
    assert mapped.lines == [
        {
            "item_no": "I-0001",
            "description": "Item SKU-1",
            "quantity": Decimal(1),
            "unit_price": Decimal("9.50"),
            "tax_code": "V19",
            "line_no": 1,
        }
    ]
    assert mapped.customer.email == "kunde1@example.com" and not mapped.customer.guest

    with pytest.raises(OrderRejected) as info:
        map_order(m, sample_order(1, skus=["AB-12"]), shop="s", e_number="1", lookups=lk)
    assert (
        info.value.reason == "line 1: SKU 'AB-12' has no ERP item" and info.value.kind == "mapping"
    )

    with pytest.raises(OrderRejected) as info:
        map_order(
            m,
            sample_order(1, skus=["SKU-1"], payment_method="bitcoin"),
            shop="s",
            e_number="1",
            lookups=lk,
        )
    assert "payment 'bitcoin' has no ERP mapping" in info.value.reason


def test_map_dry_run_prints_rows_and_writes_nothing(tmp_path, pg_erp_url):
    cfg = make_config(tmp_path, pg_erp_url)
    order_file = tmp_path / "order.json"
    order_file.write_text(json.dumps(sample_order(77, skus=["SKU-2", "SKU-3"])))
    out = io.StringIO()
    args = argparse.Namespace(
        order=str(order_file), dry_run=True, shop=None, mapping=None, e_number=None
    )
    assert run_map(cfg, args, out) == 0
    text = out.getvalue()
    assert "-- order_header (1 row)" in text and '"e_number": "77"' in text
    assert "-- order_line (2 rows)" in text and "I-0002" in text and "I-0003" in text
    assert re.search(r'"order_no": "<assigned at import>"', text)
    from tests.test_orders_support import erp_count

    assert erp_count(pg_erp_url, "order_header") == 0


_EXPRS = [
    "concat(order.a, ' ', order.b)",
    "decimal(order.n) * 2 + 1",
    "order.items[0].q if order.items else -1",
    "coalesce(order.a, order.b, 'x')",
    "order.n > 3 and order.a or order.b",
    "not order.a",
    "order.items[-1]",
    "upper(order.a) in ['X', 'Y']",
    "len(order.items) + sum(order.items, 'q')",
    "order.n // 2 - order.n % 3",
]
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    order=st.fixed_dictionaries(
        {},
        optional={
            "a": _json,
            "b": _json,
            "n": st.integers(-50, 50) | st.text(max_size=3),
            "items": st.lists(st.fixed_dictionaries({"q": st.integers(0, 9)}), max_size=3),
        },
    )
)
def test_compiled_expressions_match_the_reference_evaluator(order):
    for source in _EXPRS:
        e = ex.parse(source, NAMES)
        outcomes = []
        for run in (
            lambda e=e: e.evaluate({"order": order}, {}),
            lambda e=e: e.interpret({"order": order}, {}),
        ):
            try:
                outcomes.append(("ok", run()))
            except (ex.ExprError, TypeError, ArithmeticError) as exc:
                outcomes.append(("error", type(exc).__name__ == "ExprError"))
        assert outcomes[0][0] == outcomes[1][0], (source, order, outcomes)
        if outcomes[0][0] == "ok":
            assert outcomes[0] == outcomes[1], (source, order, outcomes)
