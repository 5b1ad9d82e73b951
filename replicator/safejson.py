"""JSON from senders we do not trust, parsed within limits and into values the stores can hold.

Python's :func:`json.loads` takes a signed webhook body at its word, and several bodies make it (or
what is done with the result later) fail with an exception nobody expects:

* nesting of ~1,000 arrays or objects raises ``RecursionError``;
* an integer of more than 4,300 digits raises a plain ``ValueError`` (CPython's int/str limit);
* ``NaN`` and ``Infinity`` are accepted although JSON has no such numbers;
* ``"\\ud800"`` (a lone surrogate) becomes a ``str`` that cannot be encoded to UTF-8, so SQLite,
  PostgreSQL and every log line fail on it later;
* ``"\\u0000"`` becomes a NUL character, which PostgreSQL text columns refuse.

:func:`loads` checks the nesting depth before parsing (a linear scan, no recursion), parses
numbers through hooks that refuse oversized ones, and then walks the result once to refuse the
strings no store can hold. Every refusal is a :class:`JsonRefused` (a ``ValueError``) whose message
names the limit and the field (a dotted path such as ``line_items[0].sku``), so a person can act
on it. Nothing else escapes: the caller parks or refuses the body, and never answers 5xx.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_NUMBER_CHARS",
    "JsonRefused",
    "field_problem",
    "loads",
    "unstorable",
]

#: Arrays/objects nested deeper than this are refused (an order payload needs fewer than ten).
MAX_DEPTH = 64
#: Number literals longer than this (digits, sign, point and exponent) are refused; so is a float
#: that overflows, and in Decimal mode an exponent beyond ±MAX_NUMBER_CHARS (``1e999999`` is short
#: but no ERP column holds it).
MAX_NUMBER_CHARS = 40

# A complete JSON string literal (the "unrolled loop" form: no backtracking on long strings).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonRefused(ValueError):
    """The text is not JSON, or holds something beyond the limits; the message says what and
    where."""


class _Refused:
    """A number or constant the parse hooks refused; reported with its field by the walk."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _depth(text: str) -> int:
    """The deepest nesting of arrays/objects, brackets inside string literals not counted."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _int(literal: str) -> Any:
    if len(literal) > MAX_NUMBER_CHARS:
        return _Refused(
            f"a number of {len(literal.lstrip('-'))} digits (limit {MAX_NUMBER_CHARS} characters)"
        )
    return int(literal)


def _number(literal: str, as_decimal: bool) -> Any:
    if len(literal) > MAX_NUMBER_CHARS:
        return _Refused(
            f"a number of {len(literal)} characters (limit {MAX_NUMBER_CHARS} characters)"
        )
    try:
        value = Decimal(literal)
    except InvalidOperation:  # the scanner only hands over valid literals; stay safe anyway
        return _Refused(f"{literal!r} is not a number")
    if not as_decimal:
        number = float(value)
        if math.isinf(number):
            return _Refused(f"the number {literal} is out of range")
        return number
    # Decimals go into ERP numeric columns: an exponent beyond the limit fits none of them.
    if not value.is_zero() and abs(value.adjusted()) > MAX_NUMBER_CHARS:
        return _Refused(
            f"the number {literal} is out of range (exponent limit ±{MAX_NUMBER_CHARS})"
        )
    return value


def _constant(name: str) -> Any:
    return _Refused(f"{name} is not a JSON number")


def field_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as text (NUL, lone surrogate), or None when it can."""
    if "\x00" in text:
        return "contains a NUL character (U+0000), which the stores cannot hold"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"invalid Unicode (lone surrogate U+{ord(text[exc.start]):04X})"
    return None


def unstorable(fields: Mapping[str, str]) -> str | None:
    """``"name: why"`` for the first field (query or form parameter) whose name or value cannot be
    stored, or None: the edge answers 400 with it instead of letting the store fail later."""
    for name, value in fields.items():
        problem = field_problem(name)
        if problem is not None:
            return f"a parameter name: {problem}"
        problem = field_problem(value)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _where(path: str) -> str:
    return f"field {path}" if path else "the top-level value"


def _check(value: Any, check_text: bool) -> None:
    """Walk the parsed value (depth is bounded already) and refuse refused numbers and, with
    ``check_text``, strings that cannot be stored."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                problem = field_problem(key) if check_text else None
                if problem is not None:
                    raise JsonRefused(f"a key in {_where(path)}: {problem}")
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, str) and check_text:
            problem = field_problem(item)
            if problem is not None:
                raise JsonRefused(f"{_where(path)}: {problem}")
        elif isinstance(item, _Refused):
            raise JsonRefused(f"{_where(path)}: {item.reason}")


def loads(
    data: bytes | str,
    *,
    decimal: bool = False,
    check_text: bool = True,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse untrusted JSON; numbers with a fraction are Decimal when ``decimal`` (money stays
    exact; exponents are then limited too), float otherwise. Raises :class:`JsonRefused` for
    anything that is not plain JSON within the limits. ``check_text=False`` leaves strings
    unchecked, for a caller that stores none of them as they are and checks the few it uses."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRefused(f"not UTF-8 text (invalid byte at position {exc.start})") from None
    else:
        text = data
    depth = _depth(text)
    if depth > max_depth:
        raise JsonRefused(f"malformed JSON: nested {depth} levels deep (limit {max_depth})")
    try:
        value = json.loads(
            text,
            parse_int=_int,
            parse_float=lambda s: _number(s, decimal),
            parse_constant=_constant,
        )
    except json.JSONDecodeError as exc:
        raise JsonRefused(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:  # not reachable within max_depth; never let it out regardless
        raise JsonRefused(f"malformed JSON: nested too deeply (limit {max_depth})") from None
    _check(value, check_text)
    return value
