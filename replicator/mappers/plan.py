"""Plan mappings: one order as a plan of row writes into a real ERP (``format = "plan"``).

The first mapping format (:mod:`replicator.mappers.orders`) fits a schema shaped after it: a header
and lines linked by a number from a number series. Real ERPs (Tryton, Dolibarr) link rows through
generated keys, keep taxes in child rows of lines, spread a customer over several tables and have
numbering of their own. A plan mapping says, in order, which rows one order becomes:

* ``[customer]``: matched by e-mail (``[customer.match]``, any table, extra filters), else created
  by ``[[customer.rows]]`` (party, contact, ...); guests get the key ``customer.guest`` yields;
* ``[[rows]]``: rows written before the header, each optionally matched first (``match``: reuse
  a row whose columns hold the same values), e.g. the invoice and shipping addresses;
* ``[header]``: one row; ``returning`` hands back its generated key (``header.id``) and
  ``[header.after]`` updates the row with it (Dolibarr's provisional ref ``(PROV<rowid>)``);
* ``[lines]`` with ``source`` (a list in the order) and ``[[lines.children]]`` per line (taxes);
* ``[order]``: which value is the linking key (``header.id``) and which the number people see
  (``header.number``); ``[numbers.*]``: the ERP's own numbering (``next_number('sale')``).

Every step's written row (with its returned key) is bound under the step's ``name`` for the
steps after it. ``lookup(table, column, filter_column, value, ...)`` reads any ERP table with
several filters. Idempotency lives in a link table sync-daemon owns in the ERP database
(``[link] table``), unique on (shop, e-number) and written in the order's transaction; the ERP's
own tables are not altered. Loading checks names and expressions; :func:`validate_plan` checks
every table, column, lookup and number source against the live ERP with the messages start-up
and ``check-config --connect`` print. Executing the plan is :mod:`replicator.orders.plan_writer`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from replicator.errors import ConfigError
from replicator.mappers import expr as ex
from replicator.mappers.expr import short_repr
from replicator.mappers.orders import (
    HEADER_NAMES,
    SQLGLOT_DIALECT,
    ColumnInfo,
    ColumnRule,
    MappingLoader,
    OrderMapping,
    SchemaCheck,
    parse_mapping,
    qident,
    qtable,
    read_mapping_file,
    validate_mapping,
)

PLAN_FORMAT = "plan"
DEFAULT_LINK_TABLE = "sync_daemon_order_link"


@dataclass(frozen=True)
class RowStep:
    """One row (or one row per element of ``source``) the plan writes."""

    key: str  # "header", "lines", "lines.children[0]", "customer.rows[1]", "rows[0]"
    name: str  # the written row is bound under this name for later steps
    table: str
    rules: tuple[ColumnRule, ...]
    returning: str | None = None
    match: tuple[str, ...] = ()
    when: ex.Expr | None = None
    after: tuple[ColumnRule, ...] = ()
    source: ex.Expr | None = None
    alias: str = "line"
    parent_column: str | None = None
    children: tuple[RowStep, ...] = ()


@dataclass(frozen=True)
class NumberSpec:
    """Where the ERP takes a number from.

    ``sequence``: a database sequence. ``counter``: a row whose ``value_column`` is the next
    number (locked while it is taken). ``row_sequence``: a row (found by ``key_column = key``)
    whose id names a database sequence ``<sequence_prefix><id>`` -- Tryton's ``ir_sequence``.
    """

    key: str
    kind: Literal["sequence", "counter", "row_sequence"]
    sequence: str | None = None
    table: str | None = None
    key_column: str | None = None
    series_key: str | None = None
    value_column: str | None = None
    id_column: str = "id"
    sequence_prefix: str = ""
    prefix_column: str | None = None
    width_column: str | None = None
    prefix: str = ""
    width: int = 0


@dataclass(frozen=True)
class CustomerPlan:
    email: ex.Expr | None
    guest: ex.Expr | None
    match_table: str | None
    match_key_column: str | None
    match_email_column: str | None
    match_filters: tuple[ColumnRule, ...]
    rows: tuple[RowStep, ...]
    key: ex.Expr | None
    create: bool
    # The shop's customer number, matched in match_number_column before the e-mail.
    number: ex.Expr | None = None
    match_number_column: str | None = None


@dataclass(frozen=True)
class LookupUse:
    key: str
    table: str
    column: str
    filters: tuple[str, ...]


@dataclass
class PlanMapping:
    """A loaded plan mapping; ``schema`` is filled by :func:`validate_plan`."""

    path: str
    hash: str
    dialect: str
    required: tuple[str, ...]
    e_number_prefix: str
    link_table: str
    link_schema: str | None
    numbers: dict[str, NumberSpec]
    customer: CustomerPlan | None
    rows: tuple[RowStep, ...]
    header: RowStep
    lines: RowStep
    order_key: ex.Expr
    order_number: ex.Expr
    posted_column: str | None
    posted_values: tuple[Any, ...]
    cancel_column: str | None
    cancel_value: Any
    maps: dict[str, dict[str, str]]
    lookups: tuple[LookupUse, ...]
    lookup_cache_seconds: float = 60.0
    # An index on the ERP's own e-number column, only when the mapping asks for it.
    e_number_column: str | None = None
    e_number_index: bool = False
    schema: dict[str, dict[str, ColumnInfo]] = field(default_factory=dict)

    @property
    def header_table(self) -> str:
        return self.header.table

    @property
    def lines_table(self) -> str:
        return self.lines.table

    def steps(self) -> list[RowStep]:
        """Every row step, in plan order (children after their line)."""
        out: list[RowStep] = list(self.customer.rows) if self.customer else []
        out += [*self.rows, self.header, self.lines, *self.lines.children]
        return out


def is_plan(data: dict[str, Any]) -> bool:
    return data.get("format") == PLAN_FORMAT


# --------------------------------------------------------------------------------------- loading


class _PlanLoader(MappingLoader):
    def __init__(self, path: str, data: dict[str, Any], names: frozenset[str]) -> None:
        super().__init__(path, data)
        self.names = names

    def step(
        self,
        key: str,
        sec: dict[str, Any],
        *,
        default_name: str,
        iterate: bool = False,
        children: bool = False,
    ) -> RowStep:
        known = {"name", "table", "columns", "returning", "match", "when", "after"}
        if iterate:
            known |= {"source", "as", "parent_column"}
        if children:
            known.add("children")
        for k in sec:
            if k not in known:
                self.err(f"{key}.{k}", f"unknown key (known: {', '.join(sorted(known))})")
        name = sec.get("name", default_name)
        if not isinstance(name, str) or not ex_ident(name):
            self.err(f"{key}.name", f"{short_repr(name)} is not a plain name")
            name = default_name
        match = sec.get("match", [])
        if not isinstance(match, list) or not all(
            isinstance(m, str) and ex_ident(m) for m in match
        ):
            self.err(f"{key}.match", "must be a list of column names")
            match = []
        when = sec.get("when")
        source = sec.get("source") if iterate else None
        alias = sec.get("as", "line") if iterate else "line"
        if not isinstance(alias, str) or not ex_ident(alias):
            self.err(f"{key}.as", f"{short_repr(alias)} is not a plain name")
            alias = "line"
        kids: list[RowStep] = []
        if children:
            raw = sec.get("children", [])
            if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
                self.err(f"{key}.children", "must be an array of tables ([[lines.children]])")
                raw = []
            kids = [
                self.step(f"{key}.children[{i}]", c, default_name=f"child{i}", iterate=True)
                for i, c in enumerate(raw)
            ]
        columns = sec.get("columns")
        if not isinstance(columns, dict):
            self.err(f"{key}.columns", "required section is missing")
        return RowStep(
            key=key,
            name=name,
            table=self.ident(sec, key, "table", table=True) or "",
            rules=self.rules_from(f"{key}.columns", columns, self.names)
            if isinstance(columns, dict)
            else (),
            returning=self.ident(sec, key, "returning", required=False),
            match=tuple(match),
            when=self.expression(f"{key}.when", when, self.names) if when is not None else None,
            after=self.rules_from(f"{key}.after", sec["after"], self.names)
            if isinstance(sec.get("after"), dict)
            else (),
            source=self.expression(f"{key}.source", source, self.names)
            if iterate and source is not None
            else None,
            alias=alias,
            parent_column=self.ident(sec, key, "parent_column", required=False)
            if iterate
            else None,
            children=tuple(kids),
        )

    def number(self, key: str, sec: dict[str, Any]) -> NumberSpec:
        width = sec.get("width", 0)
        if not isinstance(width, int) or not 0 <= width <= 20:
            self.err(f"{key}.width", f"{width!r} must be a whole number 0..20")
            width = 0
        prefix = str(sec.get("prefix", ""))
        if "sequence" in sec:
            return NumberSpec(
                key=key,
                kind="sequence",
                sequence=self.ident(sec, key, "sequence", table=True),
                prefix=prefix,
                width=width,
            )
        series_key = sec.get("key")
        if not isinstance(series_key, str | int):
            self.err(f"{key}.key", "required: the value of key_column that picks the row")
        table = self.ident(sec, key, "table", table=True)
        key_column = self.ident(sec, key, "key_column")
        prefix_column = self.ident(sec, key, "prefix_column", required=False)
        width_column = self.ident(sec, key, "width_column", required=False)
        picked = str(series_key) if series_key is not None else None
        if "sequence_prefix" in sec:
            sp = sec.get("sequence_prefix")
            if not isinstance(sp, str) or not ex_ident(sp + "x"):
                self.err(f"{key}.sequence_prefix", f"{short_repr(sp)} is not a plain name prefix")
                sp = ""
            return NumberSpec(
                key=key,
                kind="row_sequence",
                table=table,
                key_column=key_column,
                series_key=picked,
                id_column=self.ident(sec, key, "id_column", required=False) or "id",
                sequence_prefix=sp,
                prefix_column=prefix_column,
                width_column=width_column,
                prefix=prefix,
                width=width,
            )
        return NumberSpec(
            key=key,
            kind="counter",
            table=table,
            key_column=key_column,
            series_key=picked,
            value_column=self.ident(sec, key, "value_column"),
            prefix_column=prefix_column,
            width_column=width_column,
            prefix=prefix,
            width=width,
        )


def ex_ident(name: str) -> bool:
    try:
        qident(name, "postgresql")
    except ValueError:
        return False
    return True


def _names(data: dict[str, Any]) -> frozenset[str]:
    """Every name an expression of this plan may use: the order's, then each step's."""
    names = set(HEADER_NAMES) | {"customer", "header"}
    secs: list[Any] = []
    c = data.get("customer")
    if isinstance(c, dict):
        secs += c.get("rows", []) if isinstance(c.get("rows"), list) else []
    secs += data.get("rows", []) if isinstance(data.get("rows"), list) else []
    lines = data.get("lines")
    if isinstance(lines, dict):
        secs.append(lines)
        kids = lines.get("children", [])
        secs += kids if isinstance(kids, list) else []
        names |= {"line", "line_no", "line_row"}
    for s in secs:
        if not isinstance(s, dict):
            continue
        for k in ("name", "as"):
            v = s.get(k)
            if isinstance(v, str):
                names.add(v)
                if k == "as":
                    names.add(f"{v}_no")
    return frozenset(n for n in names if isinstance(n, str) and ex_ident(n))


def parse_plan(data: dict[str, Any], path: str, dialect: str, digest: str = "") -> PlanMapping:
    if dialect not in SQLGLOT_DIALECT:
        raise ConfigError(f"{path}: unsupported ERP dialect {dialect!r}")
    names = _names(data)
    ld = _PlanLoader(path, data, names)
    known = {
        "format",
        "required",
        "e_number_prefix",
        "link",
        "numbers",
        "customer",
        "rows",
        "header",
        "lines",
        "order",
        "maps",
        "lookup_cache_seconds",
    }
    for k in data:
        if k not in known:
            ld.err(k, f"unknown key (known: {', '.join(sorted(known))})")
    required = data.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        ld.err("required", "must be a list of dotted field paths")
        required = []
    prefix = data.get("e_number_prefix", "")
    if not isinstance(prefix, str) or len(prefix) > 20:
        ld.err("e_number_prefix", "must be a short text, e.g. 'WOO-'")
        prefix = ""

    link = ld.section("link", required=False)
    link_table = ld.ident(link, "link", "table", required=False, table=True) or DEFAULT_LINK_TABLE
    link_schema, _, _ = link_table.rpartition(".")

    numbers: dict[str, NumberSpec] = {}
    for name, sec in ld.section("numbers", required=False).items():
        if not isinstance(sec, dict):
            ld.err(f"numbers.{name}", "must be a table")
            continue
        numbers[name] = ld.number(f"numbers.{name}", sec)

    customer = None
    c = ld.section("customer", required=False)
    if c:
        m = c.get("match") or {}
        if not isinstance(m, dict):
            ld.err("customer.match", "must be a table (table, key_column, email_column, where)")
            m = {}
        where = m.get("where", {})
        if not isinstance(where, dict):
            ld.err("customer.match.where", "must be a table of column = expression")
            where = {}
        filters = ld.rules_from("customer.match.where", where, names)
        raw_rows = c.get("rows", [])
        if not isinstance(raw_rows, list) or not all(isinstance(r, dict) for r in raw_rows):
            ld.err("customer.rows", "must be an array of tables ([[customer.rows]])")
            raw_rows = []
        create = bool(c.get("create", True))
        key_src = c.get("key")
        customer = CustomerPlan(
            email=ld.expression("customer.email", c["email"], names) if c.get("email") else None,
            guest=ld.expression("customer.guest", c["guest"], names) if c.get("guest") else None,
            match_table=ld.ident(m, "customer.match", "table", table=True) if m else None,
            match_key_column=ld.ident(m, "customer.match", "key_column") if m else None,
            match_email_column=ld.ident(m, "customer.match", "email_column", required=False)
            if m
            else None,
            number=ld.expression("customer.number", c["number"], names)
            if c.get("number")
            else None,
            match_number_column=ld.ident(m, "customer.match", "number_column", required=False)
            if m
            else None,
            match_filters=filters,
            rows=tuple(
                ld.step(f"customer.rows[{i}]", r, default_name=f"customer_row{i}")
                for i, r in enumerate(raw_rows)
            ),
            key=ld.expression("customer.key", key_src, names) if key_src else None,
            create=create,
        )
        if create and (not customer.rows or customer.key is None):
            ld.err("customer", "create = true needs [[customer.rows]] and key (e.g. 'party.id')")

    raw = data.get("rows", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        ld.err("rows", "must be an array of tables ([[rows]])")
        raw = []
    rows = tuple(ld.step(f"rows[{i}]", r, default_name=f"row{i}") for i, r in enumerate(raw))
    header = ld.step("header", ld.section("header"), default_name="header")
    if header.name != "header":
        ld.err("header.name", "the header row is always called 'header'")
    lines = ld.step(
        "lines", ld.section("lines"), default_name="line_row", iterate=True, children=True
    )
    if lines.source is None:
        ld.err("lines.source", "required: the list in the order that becomes lines")
    if lines.parent_column is None:
        ld.err("lines.parent_column", "required: the line column that refers to the header")
    for kid in lines.children:
        if kid.source is None:
            ld.err(f"{kid.key}.source", 'required: the list that becomes rows, e.g. "[line]"')

    o = ld.section("order")
    key_src = o.get("key", "header.id")
    number_src = o.get("number", key_src)
    posted = o.get("posted") or {}
    cancel = o.get("cancel") or {}
    posted_values = posted.get("values", [True]) if isinstance(posted, dict) else [True]
    if not isinstance(posted_values, list):
        ld.err("order.posted.values", "must be a list")
        posted_values = [True]
    e_col = ld.ident(o, "order", "e_number_column", required=False)
    maps = data.get("maps", {})
    if not isinstance(maps, dict) or not all(
        isinstance(mm, dict) and all(isinstance(v, str) for v in mm.values())
        for mm in maps.values()
    ):
        ld.err("maps", "must be tables of text values, e.g. [maps.tax] reduced-rate = 'VAT 7%'")
        maps = {}
    ttl = data.get("lookup_cache_seconds", 60)
    if not isinstance(ttl, int | float) or ttl < 0:
        ld.err("lookup_cache_seconds", f"{ttl!r} must be a number of seconds >= 0")
        ttl = 60
    plan = PlanMapping(
        path=path,
        hash=digest,
        dialect=dialect,
        required=tuple(required),
        e_number_prefix=prefix,
        link_table=link_table,
        link_schema=link_schema or None,
        numbers=numbers,
        customer=customer,
        rows=rows,
        header=header,
        lines=lines,
        order_key=ld.expression("order.key", key_src, names) or ex.parse("None", names),
        order_number=ld.expression("order.number", number_src, names) or ex.parse("None", names),
        posted_column=ld.ident(posted, "order.posted", "column", required=False)
        if isinstance(posted, dict) and posted
        else None,
        posted_values=tuple(posted_values),
        cancel_column=ld.ident(cancel, "order.cancel", "column", required=False)
        if isinstance(cancel, dict) and cancel
        else None,
        cancel_value=cancel.get("value") if isinstance(cancel, dict) else None,
        maps={str(k): dict(v) for k, v in maps.items()},
        lookups=(),
        lookup_cache_seconds=float(ttl),
        e_number_column=e_col,
        e_number_index=bool(o.get("e_number_index", False)),
    )
    plan.lookups = tuple(_check_calls(plan, ld))
    if ld.errors:
        raise ConfigError("\n".join(ld.errors))
    return plan


def _exprs(plan: PlanMapping) -> list[tuple[str, ex.Expr]]:
    out: list[tuple[str, ex.Expr]] = []
    c = plan.customer
    if c is not None:
        out += [
            (k, e)
            for k, e in (
                ("customer.email", c.email),
                ("customer.number", c.number),
                ("customer.guest", c.guest),
            )
            if e
        ]
        out += [(r.key, r.expr) for r in c.match_filters if r.expr]
        if c.key is not None:
            out.append(("customer.key", c.key))
    for s in plan.steps():
        out += [(r.key, r.expr) for r in (*s.rules, *s.after) if r.expr]
        out += [(f"{s.key}.{k}", e) for k, e in (("when", s.when), ("source", s.source)) if e]
    out += [("order.key", plan.order_key), ("order.number", plan.order_number)]
    return out


def _check_calls(plan: PlanMapping, ld: MappingLoader) -> list[LookupUse]:
    """``lookup`` takes constant table/column names (checked like any name); ``next_number``
    names a ``[numbers.*]`` section; ``item`` belongs to the first mapping format."""
    uses: list[LookupUse] = []
    for key, e in _exprs(plan):
        for node in ast.walk(e.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            fn, args = node.func.id, node.args
            if fn == "item":
                ld.err(key, "item() is not available in a plan mapping; use lookup()")
            elif fn == "next_number":
                name = args[0].value if args and isinstance(args[0], ast.Constant) else None
                if len(args) != 1 or name not in plan.numbers:
                    ld.err(key, f"next_number() needs one of: {', '.join(sorted(plan.numbers))}")
            elif fn == "lookup":
                consts = [
                    a.value
                    if isinstance(a, ast.Constant)
                    and isinstance(a.value, str)
                    and ex_ident(a.value)
                    else None
                    for a in args
                ]
                if len(args) < 4 or len(args) % 2 or None in consts[:2] or None in consts[2::2]:
                    ld.err(
                        key,
                        "lookup(table, column, filter_column, value, ...) needs table and column "
                        "names as quoted text and pairs of filter column and value",
                    )
                    continue
                uses.append(
                    LookupUse(key, str(consts[0]), str(consts[1]), tuple(map(str, consts[2::2])))
                )
    return uses


# ------------------------------------------------------------------------------------ validation


def validate_plan(plan: PlanMapping, engine: sa.Engine) -> None:
    """Check a plan against the live ERP; raises ConfigError naming the file and every key."""
    chk = SchemaCheck(plan.path, engine)
    err, table = chk.err, chk.table

    def column(key: str, tname: str | None, name: str | None) -> None:
        cols = chk.schema.get(tname or "")
        if cols is not None and name and name not in cols:
            err(key, f"column {name!r} does not exist in table {tname!r}")

    for s in plan.steps():
        cols = table(f"{s.key}.table", s.table)
        if cols is None:
            continue
        for name, what in (
            (s.returning, "returning"),
            (s.parent_column, "parent_column"),
            *((m, "match") for m in s.match),
        ):
            column(f"{s.key}.{what}", s.table, name)
        chk.rules(cols, s.table, s.rules, {s.returning or ""}, where=s.key)
        chk.rules(cols, s.table, s.after, set(), not_null=False)
    c = plan.customer
    if c is not None and c.match_table and table("customer.match.table", c.match_table):
        column("customer.match.key_column", c.match_table, c.match_key_column)
        column("customer.match.email_column", c.match_table, c.match_email_column)
        column("customer.match.number_column", c.match_table, c.match_number_column)
        for r in c.match_filters:
            column(r.key, c.match_table, r.column)
    for u in plan.lookups:
        if table(u.key, u.table) is not None:
            for name in (u.column, *u.filters):
                column(u.key, u.table, name)
    for key, col in (
        ("order.posted.column", plan.posted_column),
        ("order.cancel.column", plan.cancel_column),
        ("order.e_number_column", plan.e_number_column),
    ):
        column(key, plan.header.table, col)
    if plan.header.returning is None:
        err("header.returning", "required: the header's key column (e.g. 'id', 'rowid')")
    for n in plan.numbers.values():
        _validate_number(plan, engine, chk, n, column)
    chk.raise_if_any()
    plan.schema = chk.schema


def _validate_number(
    plan: PlanMapping, engine: sa.Engine, chk: SchemaCheck, n: NumberSpec, column: Any
) -> None:
    """The numbering source exists: a sequence, or exactly one row (and its sequence)."""
    if n.kind == "sequence":
        if engine.dialect.name == "postgresql" and n.sequence:
            schema, _, name = n.sequence.rpartition(".")
            if name not in chk.insp.get_sequence_names(schema=schema or None):
                chk.err(f"{n.key}.sequence", f"sequence {n.sequence!r} does not exist in the ERP")
        return
    if chk.table(f"{n.key}.table", n.table) is None or not n.key_column:
        return
    for what in ("key_column", "value_column", "id_column", "prefix_column", "width_column"):
        name = getattr(n, what)
        if name and not (what == "value_column" and n.kind != "counter"):
            column(f"{n.key}.{what}", n.table, name)
    pick = n.id_column if n.kind == "row_sequence" else n.value_column or n.key_column
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT {qident(pick, plan.dialect)} FROM {qtable(n.table or '', plan.dialect)} "
                f"WHERE {qident(n.key_column, plan.dialect)} = :k"
            ),
            {"k": n.series_key},
        ).all()
    if len(rows) != 1:
        found = "no row" if not rows else f"{len(rows)} rows"
        chk.err(f"{n.key}.key", f"{found} with {n.key_column} = {n.series_key!r} in {n.table}")
        return
    if n.kind == "row_sequence" and engine.dialect.name == "postgresql":
        seq = f"{n.sequence_prefix}{rows[0][0]}"
        if seq not in chk.insp.get_sequence_names():
            chk.err(f"{n.key}.sequence_prefix", f"sequence {seq!r} does not exist in the ERP")


# ------------------------------------------------------------------------------ either format


def load_any(path: str | Path, dialect: str) -> OrderMapping | PlanMapping:
    """Load a mapping file of either format (``format = "plan"`` picks the plan format)."""
    data, digest = read_mapping_file(path)
    if is_plan(data):
        return parse_plan(data, str(Path(path)), dialect, digest)
    return parse_mapping(data, str(Path(path)), dialect, digest)


def validate_any(mapping: OrderMapping | PlanMapping, engine: sa.Engine) -> None:
    """Check a mapping of either format against the live ERP (start-up and check-config)."""
    if isinstance(mapping, PlanMapping):
        validate_plan(mapping, engine)
    else:
        validate_mapping(mapping, engine)
