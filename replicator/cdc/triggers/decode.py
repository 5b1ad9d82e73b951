"""Decoding changelog row images (JSON) into the Python values staging expects.

The triggers write each row as a JSON object; JSON knows only strings, numbers, booleans, null,
arrays and objects. This module turns them back into what a capture source hands to staging
(int, Decimal, float, bool, date, datetime — tz-aware for ``timestamp with time zone`` —, time,
UUID, dict/list for json, bytes for bytea/blob) by the column's type name. Type names are
PostgreSQL's (``format_type``); MariaDB and SQLite columns are described with PostgreSQL type names
by :mod:`replicator.cdc.triggers.dialects`, so one decoder serves every dialect.

JSON numbers are parsed with ``parse_float=Decimal`` (:func:`loads`) so ``numeric`` keeps every
digit and its scale. A value that does not parse as its type (``infinity``, a MariaDB TIME beyond
24 h, free text in an SQLite DATE column) is kept as it came: decoding never stops the line.

The initial copy selects rows through the very same JSON expressions as the triggers and decodes
them here too, so copied and streamed rows are identical by construction.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable
from typing import Any

from replicator.changes import Column, TableSchema

Decoder = Callable[[Any], Any]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


_JSON = json.JSONDecoder(parse_float=decimal.Decimal)


def loads(text: str | bytes | None) -> Any:
    """Parse changelog JSON keeping decimal digits exact."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode()
    # raw_decode: the triggers write compact JSON without surrounding whitespace
    return _JSON.raw_decode(text)[0]


def _safe(fn: Decoder) -> Decoder:
    def dec(v: Any) -> Any:
        if v is None:
            return None
        try:
            return fn(v)
        except (ValueError, TypeError, ArithmeticError):
            return v

    return dec


def _numeric(v: Any) -> Any:
    return v if isinstance(v, decimal.Decimal) else decimal.Decimal(str(v))


def _float(v: Any) -> Any:
    return float(v)


def _bool(v: Any) -> Any:
    if isinstance(v, str):
        return v.lower() in ("t", "true", "1", "y", "yes", "on")
    return bool(v)


def _date(v: Any) -> Any:
    return dt.date.fromisoformat(v[:10]) if isinstance(v, str) else v


def _timestamp(v: Any) -> Any:
    if isinstance(v, (int, decimal.Decimal)):  # MariaDB TIMESTAMP as UNIX_TIMESTAMP()
        return _from_epoch(v).replace(tzinfo=None)
    return dt.datetime.fromisoformat(v)


def _timestamptz(v: Any) -> Any:
    if isinstance(v, (int, decimal.Decimal)):
        return _from_epoch(v)
    d = dt.datetime.fromisoformat(v)
    return d if d.tzinfo is not None else d.replace(tzinfo=dt.UTC)


def _from_epoch(v: int | decimal.Decimal) -> dt.datetime:
    d = decimal.Decimal(v)
    secs = int(d)
    micros = int((d - secs) * 1_000_000)
    return _EPOCH + dt.timedelta(seconds=secs, microseconds=micros)


def _time(v: Any) -> Any:
    return dt.time.fromisoformat(v)


def _uuid(v: Any) -> Any:
    return uuid.UUID(str(v))


def _bytes(v: Any) -> Any:
    s = str(v)
    if s.startswith("\\x"):  # PostgreSQL bytea in JSON
        s = s[2:]
    return bytes.fromhex(s)


def _json(v: Any) -> Any:
    # jsonb/json columns arrive as embedded JSON values already; floats inside stay Decimal-free
    # for fidelity with psycopg's loader, which parses them as float.
    return _floats(v)


def _floats(v: Any) -> Any:
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, list):
        return [_floats(x) for x in v]
    if isinstance(v, dict):
        return {k: _floats(x) for k, x in v.items()}
    return v


def decoder_for(col: Column) -> Decoder | None:
    """The decoder of one column, chosen by its (PostgreSQL) type name; ``None`` when the JSON
    value is already the Python value (integers, text, arrays)."""
    t = col.type_name.lower()
    if t.endswith("[]"):
        return None
    base = t.split("(")[0].strip()
    if base in ("smallint", "integer", "bigint", "int2", "int4", "int8"):
        return None  # JSON integers are Python ints already
    if base in ("numeric", "decimal"):
        return _safe(_numeric)
    if base in ("real", "double precision", "float4", "float8"):
        return _safe(_float)
    if base in ("boolean", "bool"):
        return _safe(_bool)
    if base == "date":
        return _safe(_date)
    if base.startswith("timestamp"):
        return _safe(_timestamptz if "with time zone" in t else _timestamp)
    if base.startswith("time") and "with time zone" not in t:
        return _safe(_time)
    if base == "uuid":
        return _safe(_uuid)
    if base == "bytea":
        return _safe(_bytes)
    if base in ("json", "jsonb"):
        return _json
    return None


class RowDecoder:
    """Decodes row images and keys of one table; rebuilt when the table's columns change."""

    __slots__ = ("convert", "decoders", "names", "schema", "shapes")

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.decoders = {c.name: decoder_for(c) for c in schema.columns}
        self.names = self.decoders.keys()
        self.convert = [(k, f) for k, f in self.decoders.items() if f is not None]
        # Column sets of row images already held against the catalog (outdated listed-column
        # triggers keep sending a narrower image: looked at once, not on every row).
        self.shapes: set[frozenset[str]] = {frozenset(self.names)}

    def new_shape(self, image: dict[str, Any]) -> bool:
        """Whether ``image`` has a column set not seen before (the table may have changed)."""
        if image.keys() == self.names:
            return False  # the usual image, every column: no set built per row
        shape = frozenset(image)
        if shape in self.shapes:
            return False
        self.shapes.add(shape)
        return True

    def knows(self, image: dict[str, Any]) -> bool:
        """Whether every column of ``image`` is known (else the schema must be refreshed)."""
        return image.keys() <= self.names

    def decode(self, image: dict[str, Any]) -> dict[str, Any]:
        """Convert ``image`` (a freshly parsed dict, changed in place) to Python values."""
        for k, f in self.convert:
            v = image.get(k)
            if v is not None:
                image[k] = f(v)
        return image
