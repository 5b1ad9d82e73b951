"""What a plan's expressions see and call for one order, and how their failures end.

The context (``order``, ``shop``, ``e_number``, ``auto_invoice``, then each written row under its
step's name), the functions bound to the order's connection (``map``, ``now``, ``lookup``,
``next_number``), and evaluation: a failed lookup rejects the order as a mapping problem (the
ERP's master data or the mapping must change), any other expression error as bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from replicator.mappers import expr as ex
from replicator.mappers.orders import (
    ColumnRule,
    OrderRejected,
    coerce_to_column,
    map_value,
    present_in,
)
from replicator.mappers.plan import PlanMapping
from replicator.orders.plan.lookups import ErpLookups
from replicator.orders.plan.numbering import Numbering

Context = dict[str, Any]
"""The names an order's expressions see."""

Functions = dict[str, Callable[..., Any]]
"""The functions an order's expressions may call."""


def order_context(
    plan: PlanMapping, shop: str, e_number: str, payload: Any, auto_invoice: bool
) -> Context:
    """The context an order starts with; rejects a payload that is no object or lacks a
    required field."""
    if not isinstance(payload, dict):
        raise OrderRejected("order payload is not a JSON object")
    missing = [p for p in plan.required if not present_in(payload, p)]
    if missing:
        raise OrderRejected(f"missing required field(s): {', '.join(missing)}")
    return {
        "order": payload,
        "shop": shop,
        "e_number": plan.e_number_prefix + e_number,
        "auto_invoice": auto_invoice,
    }


def order_functions(
    plan: PlanMapping, lookups: ErpLookups, numbering: Numbering, conn: sa.Connection
) -> Functions:
    """The functions of one order, reading and numbering on its connection; ``now`` is the
    same moment for every row of the order."""
    now = datetime.now(UTC).replace(tzinfo=None)

    def map_(table: Any, value: Any) -> str:
        return map_value(plan.maps, plan.path, table, value)

    def lookup(table: Any, column: Any, *pairs: Any) -> Any:
        return lookups.lookup(conn, str(table), str(column), pairs)

    def next_number(which: Any) -> str:
        return numbering.next_number(conn, plan.numbers[str(which)], now)

    return {"map": map_, "now": lambda: now, "lookup": lookup, "next_number": next_number}


def evaluate(key: str, e: ex.Expr, ctx: Context, fns: Functions) -> Any:
    """``e``'s value; its failure rejects the order, named by the mapping ``key``."""
    try:
        return e.evaluate(ctx, fns)
    except ex.LookupFailed as exc:
        raise OrderRejected(f"{key}: {exc}", "mapping") from None
    except ex.ExprError as exc:
        raise OrderRejected(f"{key}: {exc}") from None


def column_value(
    plan: PlanMapping, rule: ColumnRule, table: str, ctx: Context, fns: Functions
) -> Any:
    """The value ``rule`` gives its column of ``table``, coerced to the column's type."""
    v = rule.const if rule.expr is None else evaluate(rule.key, rule.expr, ctx, fns)
    return coerce_to_column(v, plan.schema.get(table, {}).get(rule.column), rule.key, rule.column)
