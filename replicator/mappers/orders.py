"""Webshop order JSON → ERP rows, driven by a declarative TOML mapping file.

Responsibilities:

* :func:`load_mapping` reads a mapping file (``config/mappings/orders.toml`` is the documented
  example), rejects identifiers that are not plain names (a mapping file cannot smuggle SQL) and
  parses every expression with the safe evaluator of :mod:`replicator.mappers.expr`;
* :func:`validate_mapping` checks the mapping against the live ERP schema at start-up: unknown
  tables/columns, type mismatches, NOT NULL columns without default that nothing fills; every error
  names the mapping file and key;
* :func:`map_order` turns one order into a :class:`MappedOrder` (header, lines, customer) or raises
  :class:`OrderRejected` with a reason a person can act on (``SKU 'AB-12' has no ERP item``).

Writing the rows is :mod:`replicator.orders.writer`'s job; identifiers are quoted for the ERP's
dialect with sqlglot there (:func:`qident`, :func:`qtable`), values are always bound parameters.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
import structlog
from sqlglot import exp

from replicator.errors import ConfigError
from replicator.mappers import expr as ex

log = structlog.get_logger(__name__)

# Hyphens appear in real ERPs' names (Tryton's "sale_line-account_tax"); names are always quoted.
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")
SQLGLOT_DIALECT = {"postgresql": "postgres", "mysql": "mysql", "sqlite": "sqlite"}
HEADER_NAMES = frozenset({"order", "shop", "e_number", "auto_invoice"})
LINE_NAMES = HEADER_NAMES | {"line", "line_no"}

Kind = Literal["int", "decimal", "str", "bool", "datetime", "date", "other"]


class OrderRejected(Exception):
    """The order cannot be imported as it is; ``kind`` is ``mapping`` (fix the mapping or the ERP
    master data, then it is retried) or ``input`` (the shop sent something unusable)."""

    def __init__(self, reason: str, kind: Literal["mapping", "input"] = "input") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@functools.lru_cache(maxsize=4096)
def qident(name: str, dialect: str) -> str:
    """A column or table name quoted for the ERP's dialect (sqlglot does the quoting rules)."""
    if not _IDENT.match(name):
        raise ValueError(f"{name!r} is not a plain identifier")
    return exp.to_identifier(name, quoted=True).sql(dialect=SQLGLOT_DIALECT[dialect])


def qtable(name: str, dialect: str) -> str:
    """``table`` or ``schema.table``, each part quoted."""
    return ".".join(qident(p, dialect) for p in name.split("."))


@dataclass(frozen=True)
class ColumnRule:
    key: str  # e.g. "header.columns.total", for error messages
    column: str
    expr: ex.Expr | None
    const: Any = None


@dataclass(frozen=True)
class SeriesSpec:
    """Where numbers come from: a sequence, or a number-series row locked with FOR UPDATE."""

    key: str
    sequence: str | None = None
    table: str | None = None
    key_column: str | None = None
    series_key: str | None = None
    value_column: str | None = None
    prefix_column: str | None = None
    prefix: str = ""
    width: int = 0


@dataclass(frozen=True)
class CustomerSpec:
    table: str
    number_column: str
    email_column: str | None
    match: tuple[str, ...]
    email: ex.Expr | None
    number: ex.Expr | None
    create: bool
    guest: str | None
    series: SeriesSpec | None
    rules: tuple[ColumnRule, ...]


@dataclass(frozen=True)
class ColumnInfo:
    kind: Kind
    nullable: bool
    has_default: bool
    length: int | None
    type_name: str


@dataclass
class OrderMapping:
    """A loaded mapping file. ``schema`` is filled by :func:`validate_mapping`."""

    path: str
    hash: str
    dialect: str
    required: tuple[str, ...]
    header_table: str
    e_number_column: str
    order_number_column: str
    customer_column: str | None
    order_series: SeriesSpec
    header_rules: tuple[ColumnRule, ...]
    posted_column: str | None
    posted_values: tuple[Any, ...]
    cancel_column: str | None
    cancel_value: Any
    lines_table: str
    lines_source: ex.Expr
    lines_order_column: str
    line_number_column: str | None
    quantity_column: str | None
    max_quantity: Decimal
    line_rules: tuple[ColumnRule, ...]
    customer: CustomerSpec | None
    items_table: str | None
    sku_column: str | None
    item_column: str | None
    maps: dict[str, dict[str, str]]
    # Stored before the e-number in the ERP, so two shops' order ids cannot collide there.
    e_number_prefix: str = ""
    schema: dict[str, dict[str, ColumnInfo]] = field(default_factory=dict)


@dataclass
class CustomerRef:
    """Who ordered: matched or created by the writer inside the ERP transaction."""

    email: str | None
    number: str | None
    guest: bool
    columns: dict[str, Any]


@dataclass
class MappedOrder:
    header: dict[str, Any]
    lines: list[dict[str, Any]]
    customer: CustomerRef | None


# --------------------------------------------------------------------------------------- loading


class MappingLoader:
    """Reads a mapping file's TOML into typed rules, collecting every error (with its key) so
    one run names them all; the plan loader (:mod:`replicator.mappers.plan`) extends it."""

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.errors: list[str] = []

    def err(self, key: str, msg: str) -> None:
        self.errors.append(f"{self.path}: {key}: {msg}")

    def section(self, key: str, *, required: bool = True) -> dict[str, Any]:
        cur: Any = self.data
        for part in key.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None:
            if required:
                self.err(key, "required section is missing")
            return {}
        if not isinstance(cur, dict):
            self.err(key, "must be a table")
            return {}
        return cur

    def ident(
        self,
        sec: dict[str, Any],
        key: str,
        name: str,
        *,
        required: bool = True,
        table: bool = False,
    ) -> str | None:
        v = sec.get(name)
        if v is None or v == "":
            if required:
                self.err(f"{key}.{name}", "required key is missing")
            return None
        parts = v.split(".") if isinstance(v, str) and table else [v]
        if (
            not isinstance(v, str)
            or len(parts) > 2
            or not all(isinstance(p, str) and _IDENT.match(p) for p in parts)
        ):
            self.err(
                f"{key}.{name}", f"{ex.short_repr(v)} is not a plain name (letters, digits, _)"
            )
            return None
        return v

    def expression(self, key: str, source: Any, names: frozenset[str]) -> ex.Expr | None:
        if not isinstance(source, str):
            self.err(key, "must be an expression string")
            return None
        try:
            return ex.parse(source, names)
        except ex.ExprError as e:
            self.err(key, str(e))
            return None

    def rules(self, key: str, names: frozenset[str]) -> tuple[ColumnRule, ...]:
        return self.rules_from(key, self.section(key), names)

    def rules_from(
        self, key: str, sec: dict[str, Any], names: frozenset[str]
    ) -> tuple[ColumnRule, ...]:
        """``column = expression or constant`` pairs of one table of the mapping file."""
        out = []
        for col, value in sec.items():
            k = f"{key}.{col}"
            if not _IDENT.match(col):
                self.err(k, f"{col!r} is not a plain column name")
                continue
            if isinstance(value, str):
                e = self.expression(k, value, names)
                if e is not None:
                    out.append(ColumnRule(k, col, e))
            elif isinstance(value, bool | int | float | datetime | date):
                const = Decimal(str(value)) if isinstance(value, float) else value
                out.append(ColumnRule(k, col, None, const))
            else:
                self.err(k, f"{ex.short_repr(value)} must be an expression string or a constant")
        return tuple(out)

    def series(self, key: str, sec: dict[str, Any]) -> SeriesSpec | None:
        if not sec:
            return None
        if "sequence" in sec:
            seq = self.ident(sec, key, "sequence", table=True)
            return SeriesSpec(
                key=key,
                sequence=seq,
                prefix=str(sec.get("prefix", "")),
                width=int(sec.get("width", 0)),
            )
        width = sec.get("width", 0)
        if not isinstance(width, int) or not 0 <= width <= 20:
            self.err(f"{key}.width", f"{width!r} must be a whole number 0..20")
            width = 0
        series_key = sec.get("key")
        if not isinstance(series_key, str):
            self.err(f"{key}.key", "required: the series row's key, e.g. 'ORDER'")
        return SeriesSpec(
            key=key,
            table=self.ident(sec, key, "table", table=True),
            key_column=self.ident(sec, key, "key_column"),
            series_key=series_key if isinstance(series_key, str) else None,
            value_column=self.ident(sec, key, "value_column"),
            prefix_column=self.ident(sec, key, "prefix_column", required=False),
            prefix=str(sec.get("prefix", "")),
            width=width,
        )


def read_mapping_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """A mapping file's TOML and the hash of its bytes (ConfigError naming the file)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read mapping file: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return data, hashlib.sha256(raw).hexdigest()


def load_mapping(path: str | Path, dialect: str) -> OrderMapping:
    """Read and check a mapping file (without the ERP); raises ConfigError listing every problem."""
    data, digest = read_mapping_file(path)
    return parse_mapping(data, str(Path(path)), dialect, digest)


def parse_mapping(data: dict[str, Any], path: str, dialect: str, digest: str = "") -> OrderMapping:
    if dialect not in SQLGLOT_DIALECT:
        raise ConfigError(f"{path}: unsupported ERP dialect {dialect!r}")
    ld = MappingLoader(path, data)
    known = {"required", "header", "lines", "customer", "items", "maps"}
    for k in data:
        if k not in known:
            ld.err(k, "unknown key")
    required = data.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        ld.err("required", "must be a list of dotted field paths")
        required = []

    h = ld.section("header")
    prefix = h.get("e_number_prefix", "")
    if not isinstance(prefix, str) or len(prefix) > 20:
        ld.err("header.e_number_prefix", "must be a short text, e.g. 'WOO-'")
        prefix = ""
    order_series = ld.series("header.number_series", ld.section("header.number_series"))
    posted = h.get("posted") or {}
    cancel = h.get("cancel") or {}
    posted_col = ld.ident(posted, "header.posted", "column", required=False) if posted else None
    posted_values = posted.get("values", [True]) if isinstance(posted, dict) else [True]
    if not isinstance(posted_values, list):
        ld.err("header.posted.values", "must be a list")
        posted_values = [True]
    cancel_col = ld.ident(cancel, "header.cancel", "column", required=False) if cancel else None

    li = ld.section("lines")
    src = ld.expression("lines.source", li.get("source", "order.line_items"), HEADER_NAMES)
    max_q = li.get("max_quantity", 10000)
    if not isinstance(max_q, int | float) or max_q <= 0:
        ld.err("lines.max_quantity", f"{max_q!r} must be a positive number")
        max_q = 10000

    customer: CustomerSpec | None = None
    c = ld.section("customer", required=False)
    if c:
        match = c.get("match", ["email"])
        if not isinstance(match, list) or not set(match) <= {"email", "number"}:
            ld.err("customer.match", f"{match!r} must be a list of 'email' and/or 'number'")
            match = ["email"]
        email_src, number_src = c.get("email", ""), c.get("number", "")
        customer = CustomerSpec(
            table=ld.ident(c, "customer", "table", table=True) or "",
            number_column=ld.ident(c, "customer", "number_column") or "",
            email_column=ld.ident(c, "customer", "email_column", required=False),
            match=tuple(match),
            email=ld.expression("customer.email", email_src, HEADER_NAMES) if email_src else None,
            number=ld.expression("customer.number", number_src, HEADER_NAMES)
            if number_src
            else None,
            create=bool(c.get("create", True)),
            guest=c.get("guest") if isinstance(c.get("guest"), str) else None,
            series=ld.series(
                "customer.number_series", ld.section("customer.number_series", required=False)
            ),
            rules=ld.rules("customer.columns", HEADER_NAMES) if "columns" in c else (),
        )
        if customer.create and customer.series is None and "number" not in customer.match:
            ld.err(
                "customer.number_series", "needed to number new customers (or set create = false)"
            )

    it = ld.section("items", required=False)
    maps = data.get("maps", {})
    if not isinstance(maps, dict) or not all(
        isinstance(m, dict) and all(isinstance(v, str) for v in m.values()) for m in maps.values()
    ):
        ld.err("maps", "must be tables of text values, e.g. [maps.shipping] flat_rate = 'DHL'")
        maps = {}

    mapping = OrderMapping(
        path=path,
        hash=digest,
        dialect=dialect,
        required=tuple(required),
        header_table=ld.ident(h, "header", "table", table=True) or "",
        e_number_column=ld.ident(h, "header", "e_number_column") or "",
        order_number_column=ld.ident(h, "header", "order_number_column") or "",
        customer_column=ld.ident(h, "header", "customer_column", required=False),
        order_series=order_series or SeriesSpec(key="header.number_series"),
        header_rules=ld.rules("header.columns", HEADER_NAMES),
        posted_column=posted_col,
        posted_values=tuple(posted_values),
        cancel_column=cancel_col,
        cancel_value=cancel.get("value") if isinstance(cancel, dict) else None,
        lines_table=ld.ident(li, "lines", "table", table=True) or "",
        lines_source=src or ex.parse("order.line_items", HEADER_NAMES),
        lines_order_column=ld.ident(li, "lines", "order_number_column") or "",
        line_number_column=ld.ident(li, "lines", "line_number_column", required=False),
        quantity_column=ld.ident(li, "lines", "quantity_column", required=False),
        max_quantity=Decimal(str(max_q)),
        line_rules=ld.rules("lines.columns", LINE_NAMES),
        customer=customer,
        items_table=ld.ident(it, "items", "table", table=True) if it else None,
        sku_column=ld.ident(it, "items", "sku_column") if it else None,
        item_column=ld.ident(it, "items", "item_column") if it else None,
        maps={str(k): dict(v) for k, v in maps.items()},
        e_number_prefix=prefix,
    )
    if order_series is None:
        ld.err("header.number_series", "required: where ERP order numbers come from")
    uses_item = any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "item"
        for r in mapping.line_rules + mapping.header_rules
        if r.expr
        for n in ast.walk(r.expr.tree)
    )
    if uses_item and mapping.items_table is None:
        ld.err("items", "item() is used but no [items] table is configured")
    if ld.errors:
        raise ConfigError("\n".join(ld.errors))
    return mapping


# ------------------------------------------------------------------------------------ validation


def _kind(t: sa.types.TypeEngine[Any]) -> Kind:
    name = type(t).__name__.upper()
    if isinstance(t, sa.Boolean) or (name == "TINYINT" and getattr(t, "display_width", None) == 1):
        return "bool"
    if isinstance(t, sa.Integer):
        return "int"
    if isinstance(t, sa.Numeric):
        return "decimal"
    if isinstance(t, sa.DateTime):
        return "datetime"
    if isinstance(t, sa.Date):
        return "date"
    if isinstance(t, sa.String):
        return "str"
    return "other"


def reflect_table(insp: sa.Inspector, table: str) -> dict[str, ColumnInfo] | None:
    schema, _, name = table.rpartition(".")
    if not insp.has_table(name, schema=schema or None):
        return None
    out = {}
    for c in insp.get_columns(name, schema=schema or None):
        t = c["type"]
        out[c["name"]] = ColumnInfo(
            kind=_kind(t),
            nullable=bool(c.get("nullable", True)),
            has_default=c.get("default") is not None
            or bool(c.get("autoincrement") is True)
            or c.get("computed") is not None
            or c.get("identity") is not None,
            length=getattr(t, "length", None),
            type_name=str(t),
        )
    return out


_COMPATIBLE: dict[str, set[str]] = {
    "str": {"str", "other"},
    "int": {"int", "decimal", "str", "bool", "other"},
    "decimal": {"decimal", "int", "str", "other"},
    "bool": {"bool", "int", "str", "other"},
    "datetime": {"datetime", "date", "str", "other"},
}


def _const_type(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, Decimal):
        return "decimal"
    if isinstance(v, datetime | date):
        return "datetime"
    return None


class SchemaCheck:
    """What a mapping needs from the live ERP schema, checked once at start-up (and by
    ``check-config --connect``); every problem is named by mapping file and key."""

    def __init__(self, path: str, engine: sa.Engine) -> None:
        self.path = path
        self.insp = sa.inspect(engine)
        self.errors: list[str] = []
        self.schema: dict[str, dict[str, ColumnInfo]] = {}

    def err(self, key: str, msg: str) -> None:
        self.errors.append(f"{self.path}: {key}: {msg}")

    def table(self, key: str, name: str | None) -> dict[str, ColumnInfo] | None:
        """The table's columns, or None (and an error under ``key``) when it does not exist."""
        if not name:
            return None
        if name in self.schema:
            return self.schema[name]
        cols = reflect_table(self.insp, name)
        if cols is None:
            self.err(key, f"table {name!r} does not exist in the ERP")
            return None
        self.schema[name] = cols
        return cols

    def rules(
        self,
        cols: dict[str, ColumnInfo] | None,
        tname: str,
        rs: tuple[ColumnRule, ...],
        own: set[str],
        *,
        not_null: bool = True,
        where: str | None = None,
    ) -> None:
        """Columns exist and take what the rules yield; with ``not_null``, every NOT NULL column
        without default is filled by a rule or by ``own`` (columns the writer fills)."""
        if cols is None:
            return
        for r in rs:
            info = cols.get(r.column)
            if info is None:
                self.err(r.key, f"column {r.column!r} does not exist in table {tname!r}")
                continue
            vtype = _const_type(r.const) if r.expr is None else r.expr.result_type
            if vtype and info.kind in _COMPATIBLE and info.kind != "other":
                if info.kind not in _COMPATIBLE.get(vtype, {info.kind}) and vtype != info.kind:
                    self.err(r.key, f"yields {vtype} but {tname}.{r.column} is {info.type_name}")
                elif (
                    vtype == "str"
                    and info.kind in ("int", "decimal", "bool", "datetime", "date")
                    and r.expr is not None
                    and isinstance(r.expr.tree.body, ast.Constant)
                ):
                    self.err(r.key, f"text constant but {tname}.{r.column} is {info.type_name}")
        if not not_null:
            return
        filled = {r.column for r in rs} | own
        for name, info in cols.items():
            if not info.nullable and not info.has_default and name not in filled:
                self.err(
                    where or tname,
                    f"column {name!r} is NOT NULL without default and nothing maps it",
                )

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError("\n".join(self.errors))


def validate_mapping(mapping: OrderMapping, engine: sa.Engine) -> None:
    """Check the mapping against the live ERP schema; raises ConfigError naming file and keys."""
    chk = SchemaCheck(mapping.path, engine)
    insp, err, table = chk.insp, chk.err, chk.table

    def column(key: str, cols: dict[str, ColumnInfo] | None, name: str | None, tname: str) -> None:
        if cols is not None and name and name not in cols:
            err(key, f"column {name!r} does not exist in table {tname!r}")

    def row_exists(tname: str, cname: str, value: Any) -> bool:
        """Whether the ERP table ``tname`` has a row whose ``cname`` is ``value``."""
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    f"SELECT 1 FROM {qtable(tname, mapping.dialect)} WHERE "
                    f"{qident(cname, mapping.dialect)} = :value"
                ),
                {"value": value},
            ).first()
        return row is not None

    def rules(
        cols: dict[str, ColumnInfo] | None, tname: str, rs: tuple[ColumnRule, ...], own: set[str]
    ) -> None:
        chk.rules(cols, tname, rs, own)

    h = table("header.table", mapping.header_table)
    for key, col in (
        ("header.e_number_column", mapping.e_number_column),
        ("header.order_number_column", mapping.order_number_column),
        ("header.customer_column", mapping.customer_column),
        ("header.posted.column", mapping.posted_column),
        ("header.cancel.column", mapping.cancel_column),
    ):
        column(key, h, col, mapping.header_table)
    rules(
        h,
        mapping.header_table,
        mapping.header_rules,
        {mapping.e_number_column, mapping.order_number_column, mapping.customer_column or ""},
    )

    li = table("lines.table", mapping.lines_table)
    for key, col in (
        ("lines.order_number_column", mapping.lines_order_column),
        ("lines.line_number_column", mapping.line_number_column),
        ("lines.quantity_column", mapping.quantity_column),
    ):
        column(key, li, col, mapping.lines_table)
    rules(
        li,
        mapping.lines_table,
        mapping.line_rules,
        {mapping.lines_order_column, mapping.line_number_column or ""},
    )

    def series(s: SeriesSpec | None) -> None:
        if s is None:
            return
        if s.sequence:
            if engine.dialect.name == "postgresql":
                sname = s.sequence.rpartition(".")[2]
                if sname not in insp.get_sequence_names(
                    schema=s.sequence.rpartition(".")[0] or None
                ):
                    err(f"{s.key}.sequence", f"sequence {s.sequence!r} does not exist in the ERP")
            return
        cols = table(f"{s.key}.table", s.table)
        for name in ("key_column", "value_column", "prefix_column"):
            column(f"{s.key}.{name}", cols, getattr(s, name), s.table or "")
        if (
            cols is not None
            and s.table
            and s.key_column
            and s.value_column
            and not row_exists(s.table, s.key_column, s.series_key)
        ):
            err(f"{s.key}.key", f"no row {s.series_key!r} in {s.table}.{s.key_column}")

    series(mapping.order_series)
    if mapping.customer is not None:
        c = mapping.customer
        ct = table("customer.table", c.table)
        column("customer.number_column", ct, c.number_column, c.table)
        column("customer.email_column", ct, c.email_column, c.table)
        if c.create:
            rules(ct, c.table, c.rules, {c.number_column, c.email_column or ""})
        series(c.series)
        if (
            c.guest
            and ct is not None
            and c.number_column in ct
            and not row_exists(c.table, c.number_column, c.guest)
        ):
            err("customer.guest", f"guest customer {c.guest!r} does not exist in {c.table}")
    if mapping.items_table:
        it = table("items.table", mapping.items_table)
        column("items.sku_column", it, mapping.sku_column, mapping.items_table)
        column("items.item_column", it, mapping.item_column, mapping.items_table)
    chk.raise_if_any()
    mapping.schema = chk.schema


# --------------------------------------------------------------------------------------- mapping


def coerce_to_column(value: Any, info: ColumnInfo | None, key: str, column: str) -> Any:
    """Convert an evaluated value to what the ERP column holds; reject what does not fit."""
    if isinstance(value, str):
        if "\x00" in value:
            raise OrderRejected(f"{key}: value contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise OrderRejected(f"{key}: value is not valid Unicode text") from None
    if value is None:
        if info is not None and not info.nullable and not info.has_default:
            raise OrderRejected(f"{key}: no value, but column {column!r} is required (NOT NULL)")
        return None
    if info is None:
        return value
    try:
        if info.kind == "int":
            return ex.to_int(value)
        if info.kind == "decimal":
            return ex.to_decimal(value)
        if info.kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes"):
                return True
            if str(value).lower() in ("0", "false", "no", ""):
                return False
            raise ex.ExprError(f"{ex.short_repr(value)} is not true/false")
        if info.kind == "datetime":
            return ex.to_date(value)
        if info.kind == "date":
            d = ex.to_date(value)
            return d.date() if d else None
        if info.kind == "str":
            if isinstance(value, list | dict):
                raise ex.ExprError("a list/object cannot go into a text column")
            text = ex.to_str(value) or ""
            if info.length and len(text) > info.length:
                raise OrderRejected(
                    f"{key}: value {ex.short_repr(text)} is {len(text)} characters, "
                    f"column {column!r} holds {info.length}"
                )
            return text
    except ex.ExprError as e:
        raise OrderRejected(f"{key}: {e}") from None
    return value


def present_in(payload: Mapping[str, Any], path: str) -> bool:
    v = ex.get_path(payload, path)
    return v is not None and v != "" and v != []


def map_value(maps: dict[str, dict[str, str]], path: str, table: Any, value: Any) -> str:
    """``map(table, value)`` of a mapping file: the ``[maps.<table>]`` entry for ``value``."""
    entries = maps.get(str(table))
    if entries is None:
        raise ex.LookupFailed(f"no [maps.{table}] table in {Path(path).name}")
    key = "" if value is None else str(value)
    if key not in entries:
        raise ex.LookupFailed(
            f"{table} {key!r} has no ERP mapping (add it under [maps.{table}] in {Path(path).name})"
        )
    return entries[key]


def is_posted_value(value: Any, posted_values: tuple[Any, ...]) -> bool:
    """Whether an ERP order's status column says posted (``true`` matches 1, 'True'...)."""
    return any(value == v or str(value).lower() == str(v).lower() for v in posted_values)


class Lookups:
    """The functions a mapping binds per order: ``map``, ``item`` and ``now``.

    ``item`` asks the ERP (through ``find_item``) and caches answers, so five lines with the same
    SKU cost one query; the cache is per cycle because items change.
    """

    def __init__(
        self,
        mapping: OrderMapping,
        find_item: Callable[[str], Any] | None,
        now: datetime | None = None,
    ) -> None:
        self.mapping = mapping
        self.find_item = find_item
        self.now = now or datetime.now(UTC).replace(tzinfo=None)
        self.cache: dict[str, Any] = {}

    def map(self, table: Any, value: Any) -> str:
        return map_value(self.mapping.maps, self.mapping.path, table, value)

    def item(self, sku: Any) -> Any:
        key = "" if sku is None else str(sku)
        if not key:
            raise ex.LookupFailed("an order line has no SKU")
        if key not in self.cache:
            self.cache[key] = self.find_item(key) if self.find_item else None
        found = self.cache[key]
        if found is None:
            raise ex.LookupFailed(f"SKU {key!r} has no ERP item")
        return found

    def functions(self) -> dict[str, Callable[..., Any]]:
        return {"map": self.map, "item": self.item, "now": lambda: self.now}


def map_order(
    mapping: OrderMapping,
    payload: Any,
    *,
    shop: str,
    e_number: str,
    lookups: Lookups,
    auto_invoice: bool = False,
) -> MappedOrder:
    """Evaluate the mapping on one order. Raises :class:`OrderRejected` with the reason."""
    if not isinstance(payload, dict):
        raise OrderRejected("order payload is not a JSON object")
    missing = [p for p in mapping.required if not present_in(payload, p)]
    if missing:
        raise OrderRejected(f"missing required field(s): {', '.join(missing)}")
    ctx: dict[str, Any] = {
        "order": payload,
        "shop": shop,
        "e_number": e_number,
        "auto_invoice": auto_invoice,
    }
    fns = lookups.functions()
    hcols = mapping.schema.get(mapping.header_table, {})

    def run(rule: ColumnRule, context: dict[str, Any], cols: dict[str, ColumnInfo]) -> Any:
        try:
            v = rule.const if rule.expr is None else rule.expr.evaluate(context, fns)
        except ex.LookupFailed as e:
            raise OrderRejected(str(e), "mapping") from None
        except ex.ExprError as e:
            raise OrderRejected(f"{rule.key}: {e}") from None
        return coerce_to_column(v, cols.get(rule.column), rule.key, rule.column)

    header = {r.column: run(r, ctx, hcols) for r in mapping.header_rules}
    header[mapping.e_number_column] = coerce_to_column(
        mapping.e_number_prefix + e_number,
        hcols.get(mapping.e_number_column),
        "e-number",
        mapping.e_number_column,
    )
    try:
        source = mapping.lines_source.evaluate(ctx, fns)
    except ex.ExprError as e:
        raise OrderRejected(f"lines.source: {e}") from None
    if not isinstance(source, list) or not source:
        raise OrderRejected(
            f"order has no lines ({mapping.lines_source.source} is empty or missing)"
        )
    lcols = mapping.schema.get(mapping.lines_table, {})
    lines = []
    for i, line in enumerate(source, start=1):
        if not isinstance(line, dict):
            raise OrderRejected(f"line {i} is not a JSON object")
        lctx = {**ctx, "line": line, "line_no": i}
        row = {}
        for r in mapping.line_rules:
            try:
                row[r.column] = run(r, lctx, lcols)
            except OrderRejected as e:
                raise OrderRejected(f"line {i}: {e.reason}", e.kind) from None
        if mapping.quantity_column and mapping.quantity_column in row:
            q = row[mapping.quantity_column]
            try:
                qd = ex.to_decimal(q)
            except ex.ExprError:
                raise OrderRejected(
                    f"line {i}: quantity {ex.short_repr(q)} is not a number"
                ) from None
            if qd is None or qd <= 0:
                shown = ex.short_repr(q) if qd is None else str(qd)
                raise OrderRejected(f"line {i}: quantity {shown} must be greater than 0")
            if qd > mapping.max_quantity:
                raise OrderRejected(
                    f"line {i}: quantity {qd} exceeds the limit {mapping.max_quantity} "
                    "(lines.max_quantity)"
                )
        if mapping.line_number_column:
            row[mapping.line_number_column] = i
        lines.append(row)

    customer = None
    if mapping.customer is not None:
        c = mapping.customer
        email = number = None
        try:
            if c.email is not None:
                email = ex.to_str(c.email.evaluate(ctx, fns)) or None
            if c.number is not None:
                number = ex.to_str(c.number.evaluate(ctx, fns)) or None
        except ex.ExprError as e:
            raise OrderRejected(f"customer: {e}") from None
        if email is not None and ("@" not in email or len(email) > 254):
            raise OrderRejected(f"customer e-mail {ex.short_repr(email)} is not an e-mail address")
        guest = email is None and number is None
        if guest and not c.guest:
            raise OrderRejected(
                "order has no customer e-mail/number and no guest customer is configured"
            )
        ccols = mapping.schema.get(c.table, {})
        columns = (
            {r.column: run(r, ctx, ccols) for r in c.rules} if (c.create and not guest) else {}
        )
        if email is not None and c.email_column:
            email = coerce_to_column(
                email, ccols.get(c.email_column), "customer.email", c.email_column
            )
        customer = CustomerRef(email=email, number=number, guest=guest, columns=columns)
    return MappedOrder(header=header, lines=lines, customer=customer)
