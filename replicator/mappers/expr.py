"""A small, safe expression language for mapping files.

Mapping files say how an order field becomes an ERP column, e.g.
``concat(order.billing.first_name, ' ', order.billing.last_name)`` or ``decimal(line.price) * 2``.
The text is parsed with :mod:`ast` and only a whitelist of node types is accepted: literals, names
of the context (``order``, ``line``...), ``.field`` and ``[index]`` access on JSON data, arithmetic,
comparisons, ``and``/``or``/``not``, ``x if c else y`` and calls of whitelisted functions. No
attribute of a Python object is ever reached (``.x`` on a dict is a key lookup), nothing is
``eval``-ed, so a mapping file cannot run code.

Missing fields evaluate to ``None`` (JSON ``null``), so optional data needs no special syntax;
required fields are declared in the mapping and checked by the mapper.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

MAX_SOURCE = 2000
MAX_RESULT_LEN = 100_000


class ExprError(ValueError):
    """The expression is invalid (at load) or cannot be evaluated on this data (at run time)."""


class LookupFailed(ValueError):
    """A value needs mapping: ``map()``/``item()`` found no entry. The message names the value."""


def to_decimal(v: Any) -> Decimal | None:
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise ExprError(f"{v!r} is not a number")
    try:
        d = Decimal(str(v).strip())
    except InvalidOperation:
        raise ExprError(f"{short_repr(v)} is not a number") from None
    if not d.is_finite():
        raise ExprError(f"{short_repr(v)} is not a finite number")
    return d


def to_int(v: Any) -> int | None:
    d = to_decimal(v)
    if d is None:
        return None
    if d != d.to_integral_value():
        raise ExprError(f"{short_repr(v)} is not a whole number")
    return int(d)


def to_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def to_date(v: Any) -> datetime | None:
    if v is None or v == "":
        return None
    if isinstance(v, datetime):
        return v
    text = str(v).strip()
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ExprError(f"{short_repr(v)} is not an ISO date/time") from None
    # ERP timestamp columns are naive UTC by convention.
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


def short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _concat(*args: Any) -> str:
    return "".join("" if a is None else (to_str(a) or "") for a in args)


def _coalesce(*args: Any) -> Any:
    for a in args:
        if a is not None and a != "":
            return a
    return None


def _substr(s: Any, start: Any, length: Any = None) -> str | None:
    text = to_str(s)
    if text is None:
        return None
    i = to_int(start) or 0
    return text[i:] if length is None else text[i : i + (to_int(length) or 0)]


def _round(v: Any, places: Any = 2) -> Decimal | None:
    d = to_decimal(v)
    return None if d is None else round(d, to_int(places) or 0)


def _len(v: Any) -> int:
    return 0 if v is None else len(v)


def _join(items: Any, sep: Any = ", ") -> str:
    if items is None:
        return ""
    return str(sep).join(to_str(i) or "" for i in items)


def _sum(items: Any, field: Any = None) -> Decimal:
    total = Decimal(0)
    for i in items or ():
        v = i.get(field) if field is not None and isinstance(i, Mapping) else i
        total += to_decimal(v) or 0
    return total


def get_path(obj: Any, path: Any, default: Any = None) -> Any:
    cur = obj
    for part in str(path).split("."):
        if isinstance(cur, Mapping):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return default
    return default if cur is None else cur


# name -> (function, result type for the start-up type check or None when it depends)
PURE_FUNCTIONS: dict[str, tuple[Callable[..., Any], str | None]] = {
    "str": (to_str, "str"),
    "int": (to_int, "int"),
    "decimal": (to_decimal, "decimal"),
    "date": (to_date, "datetime"),
    "lower": (lambda s: None if s is None else str(s).lower(), "str"),
    "upper": (lambda s: None if s is None else str(s).upper(), "str"),
    "strip": (lambda s: None if s is None else str(s).strip(), "str"),
    "concat": (_concat, "str"),
    "coalesce": (_coalesce, None),
    "substr": (_substr, "str"),
    "round": (_round, "decimal"),
    "len": (_len, "int"),
    "join": (_join, "str"),
    "sum": (_sum, "decimal"),
    "get": (get_path, None),
}
# Functions the mapper binds per order (they need the ERP or the mapping tables).
BOUND_FUNCTIONS: dict[str, str | None] = {
    "map": "str",
    # The items table's item column: text or an integer key, whatever the ERP keeps there.
    "item": None,
    "now": "datetime",
    # Plan mappings only (replicator.mappers.plan): any ERP table, the ERP's own numbering.
    "lookup": None,
    "next_number": "str",
}

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


@dataclass(frozen=True)
class Expr:
    """A parsed, checked expression; ``evaluate`` runs it over a context of JSON values."""

    source: str
    tree: ast.Expression
    names: frozenset[str]
    # The tree compiled to nested closures once at load: evaluating is then a few Python calls
    # per node instead of a dispatch over node types (mapping is most of an import's CPU).
    fn: Callable[[Mapping[str, Any], Mapping[str, Callable[..., Any]]], Any] | None = None

    @property
    def result_type(self) -> str | None:
        """What the expression yields when that is evident (for the start-up type check)."""
        return _static_type(self.tree.body)

    def evaluate(
        self, context: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]
    ) -> Any:
        try:
            if self.fn is not None:
                return self.fn(context, functions)
            return _Eval(context, functions).visit(self.tree.body)
        except (ExprError, LookupFailed):
            raise
        except (TypeError, ArithmeticError) as exc:
            raise ExprError(f"cannot evaluate {self.source!r}: {exc}") from None

    def interpret(
        self, context: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]
    ) -> Any:
        """Walk the tree with the reference evaluator, errors unwrapped: the semantics the
        compiled form must match (tests compare the two)."""
        return _Eval(context, functions).visit(self.tree.body)


def _static_type(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int):
            return "int"
        if isinstance(v, float):
            return "decimal"
        if isinstance(v, str):
            return "str"
        return None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if name in PURE_FUNCTIONS:
            return PURE_FUNCTIONS[name][1]
        return BOUND_FUNCTIONS.get(name)
    if isinstance(node, ast.Compare | ast.BoolOp) or (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
    ):
        return "bool"
    return None


def parse(source: str, allowed_names: frozenset[str]) -> Expr:
    """Parse and check an expression; raises :class:`ExprError` saying what is not allowed."""
    if len(source) > MAX_SOURCE:
        raise ExprError(f"expression longer than {MAX_SOURCE} characters")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"invalid expression {source!r}: {exc.msg}") from None
    names: set[str] = set()
    functions = set(PURE_FUNCTIONS) | set(BOUND_FUNCTIONS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in functions:
                what = ast.unparse(node.func)
                raise ExprError(
                    f"{what!r} is not a known function (allowed: {', '.join(sorted(functions))})"
                )
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise ExprError("function calls take plain positional arguments only")
        elif isinstance(node, ast.Name):
            if node.id in functions:
                continue
            if node.id not in allowed_names:
                raise ExprError(
                    f"unknown name {node.id!r} (known here: {', '.join(sorted(allowed_names))})"
                )
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise ExprError(f"field names starting with '_' are not allowed ({node.attr!r})")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, str | int | float | bool | type(None)):
                raise ExprError(f"literal {node.value!r} is not allowed")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise ExprError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.Compare):
            if any(type(op) not in _CMPOPS for op in node.ops):
                raise ExprError("comparison operator is not allowed")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub | ast.UAdd | ast.Not):
                raise ExprError(f"operator {type(node.op).__name__} is not allowed")
        elif not isinstance(
            node,
            ast.Expression
            | ast.Subscript
            | ast.BoolOp
            | ast.IfExp
            | ast.List
            | ast.Tuple
            | ast.Load
            | ast.And
            | ast.Or
            | ast.operator
            | ast.cmpop
            | ast.unaryop,
        ):
            raise ExprError(f"{type(node).__name__} is not allowed in a mapping expression")
    return Expr(source=source, tree=tree, names=frozenset(names), fn=_compile(tree.body))


class _Eval:
    def __init__(self, context: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]):
        self.context = context
        self.functions = functions

    def visit(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            v = node.value
            return Decimal(str(v)) if isinstance(v, float) else v
        if isinstance(node, ast.Name):
            return self.context.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.visit(node.value)
            return base.get(node.attr) if isinstance(base, Mapping) else None
        if isinstance(node, ast.Subscript):
            base = self.visit(node.value)
            key = self.visit(node.slice)
            if isinstance(base, Mapping):
                return base.get(key) if isinstance(key, str) else None
            if isinstance(base, list | str) and isinstance(key, int) and not isinstance(key, bool):
                return base[key] if -len(base) <= key < len(base) else None
            return None
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            if left is None or right is None:
                return None
            if isinstance(node.op, ast.Mult) and (
                isinstance(left, str | list) or isinstance(right, str | list)
            ):
                raise ExprError("repeating text or lists with * is not allowed")
            if isinstance(left, float) or isinstance(right, float):
                left, right = to_decimal(left), to_decimal(right)
            result = _BINOPS[type(node.op)](left, right)
            if isinstance(result, str | list) and len(result) > MAX_RESULT_LEN:
                raise ExprError("result too long")
            return result
        if isinstance(node, ast.UnaryOp):
            v = self.visit(node.operand)
            if isinstance(node.op, ast.Not):
                return not v
            if v is None:
                return None
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BoolOp):
            value: Any = None
            for i, sub in enumerate(node.values):
                value = self.visit(sub)
                if isinstance(node.op, ast.And) and not value:
                    return value
                if isinstance(node.op, ast.Or) and value:
                    return value
                if i == len(node.values) - 1:
                    return value
            return value
        if isinstance(node, ast.Compare):
            left = self.visit(node.left)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = self.visit(comp)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.visit(node.body) if self.visit(node.test) else self.visit(node.orelse)
        if isinstance(node, ast.List | ast.Tuple):
            return [self.visit(e) for e in node.elts]
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            name = node.func.id
            fn = self.functions.get(name)
            if fn is None:
                pure = PURE_FUNCTIONS.get(name)
                if pure is None:
                    raise ExprError(f"function {name!r} is not available here")
                fn = pure[0]
            return fn(*(self.visit(a) for a in node.args))
        raise ExprError(
            f"{type(node).__name__} is not allowed"
        )  # pragma: no cover - parse() rejects


Compiled = Callable[[Mapping[str, Any], Mapping[str, Callable[..., Any]]], Any]


def _binop(op: ast.operator, left: Any, right: Any) -> Any:
    if left is None or right is None:
        return None
    if isinstance(op, ast.Mult) and (isinstance(left, str | list) or isinstance(right, str | list)):
        raise ExprError("repeating text or lists with * is not allowed")
    if isinstance(left, float) or isinstance(right, float):
        left, right = to_decimal(left), to_decimal(right)
    result = _BINOPS[type(op)](left, right)
    if isinstance(result, str | list) and len(result) > MAX_RESULT_LEN:
        raise ExprError("result too long")
    return result


def _subscript(base: Any, key: Any) -> Any:
    if isinstance(base, Mapping):
        return base.get(key) if isinstance(key, str) else None
    if isinstance(base, list | str) and isinstance(key, int) and not isinstance(key, bool):
        return base[key] if -len(base) <= key < len(base) else None
    return None


def _compile(node: ast.AST) -> Compiled:
    """Closures with exactly the semantics of :class:`_Eval` (which stays as the reference)."""
    if isinstance(node, ast.Constant):
        value = Decimal(str(node.value)) if isinstance(node.value, float) else node.value
        return lambda c, f: value
    if isinstance(node, ast.Name):
        name = node.id
        return lambda c, f: c.get(name)
    if isinstance(node, ast.Attribute):
        base, attr = _compile(node.value), node.attr

        def attribute(c: Mapping[str, Any], f: Mapping[str, Callable[..., Any]]) -> Any:
            b = base(c, f)
            return b.get(attr) if isinstance(b, Mapping) else None

        return attribute
    if isinstance(node, ast.Subscript):
        sbase, skey = _compile(node.value), _compile(node.slice)
        return lambda c, f: _subscript(sbase(c, f), skey(c, f))
    if isinstance(node, ast.BinOp):
        op, left, right = node.op, _compile(node.left), _compile(node.right)
        return lambda c, f: _binop(op, left(c, f), right(c, f))
    if isinstance(node, ast.UnaryOp):
        operand, uop = _compile(node.operand), node.op

        def unary(c: Mapping[str, Any], f: Mapping[str, Callable[..., Any]]) -> Any:
            v = operand(c, f)
            if isinstance(uop, ast.Not):
                return not v
            if v is None:
                return None
            return -v if isinstance(uop, ast.USub) else +v

        return unary
    if isinstance(node, ast.BoolOp):
        parts, is_and = [_compile(v) for v in node.values], isinstance(node.op, ast.And)

        def boolop(c: Mapping[str, Any], f: Mapping[str, Callable[..., Any]]) -> Any:
            value: Any = None
            for part in parts:
                value = part(c, f)
                if (is_and and not value) or (not is_and and value):
                    return value
            return value

        return boolop
    if isinstance(node, ast.Compare):
        first = _compile(node.left)
        rest = [
            (_CMPOPS[type(op)], _compile(comp))
            for op, comp in zip(node.ops, node.comparators, strict=True)
        ]

        def compare(c: Mapping[str, Any], f: Mapping[str, Callable[..., Any]]) -> Any:
            left = first(c, f)
            for cmp, comp in rest:
                right = comp(c, f)
                if not cmp(left, right):
                    return False
                left = right
            return True

        return compare
    if isinstance(node, ast.IfExp):
        test, body, orelse = _compile(node.test), _compile(node.body), _compile(node.orelse)
        return lambda c, f: body(c, f) if test(c, f) else orelse(c, f)
    if isinstance(node, ast.List | ast.Tuple):
        elts = [_compile(e) for e in node.elts]
        return lambda c, f: [e(c, f) for e in elts]
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        fname, args = node.func.id, [_compile(a) for a in node.args]
        pure = PURE_FUNCTIONS.get(fname)

        def call(c: Mapping[str, Any], f: Mapping[str, Callable[..., Any]]) -> Any:
            fn = f.get(fname)
            if fn is None:
                if pure is None:
                    raise ExprError(f"function {fname!r} is not available here")
                fn = pure[0]
            return fn(*(a(c, f) for a in args))

        return call
    raise ExprError(f"{type(node).__name__} is not allowed")  # pragma: no cover - parse() rejects


def today() -> date:
    return datetime.now(UTC).date()
