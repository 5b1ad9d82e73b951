"""How values are stored in staging: JSON text, row keys, column categories and types.

Capture sources hand over Python values (ints, Decimals, datetimes, UUIDs, dicts, lists,
bytes). On PostgreSQL staging they keep their types; on SQLite, numerics and temporal values are
stored as text in ISO/decimal form (never as REAL, which would round) and JSON and arrays as
JSON text. Every writer of mirror rows (the apply path, the spill, the stream consumer) goes
through these functions, so a value is stored the same way whichever path wrote it.

Text values (:func:`text_adapter`): logical capture receives every value as PostgreSQL's text
output. For the types below the stored form can be had from that text directly — cheaply and
exactly — instead of building a Python object that a converter then turns back into text. An
adapter returns either the stored form itself (a ``str``, which every converter passes through)
or, for a text of an unexpected shape, the psycopg loader's object (the converter then stores it
as it always did): the stored form is the same either way (tests/test_value_adapters.py).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import uuid
from collections.abc import Callable
from typing import Any

from psycopg.types.json import Json, Jsonb

from replicator.changes import Column

BUILTIN_OID_LIMIT = 16384  # FirstNormalObjectId: types below are built into PostgreSQL


def _json_default(v: Any) -> Any:
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, dt.timedelta):
        return str(v)
    return str(v)


def to_json(v: Any) -> str:
    return json.dumps(v, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def key_json(k: tuple[Any, ...] | None) -> str | None:
    """A row key as JSON text; ints and plain strings without a JSON encoder round trip."""
    if k is None:
        return None
    if len(k) == 1 and type(k[0]) is int:
        return f"[{k[0]}]"
    return to_json(list(k))


def column_category(col: Column) -> str:
    """A coarse storage category from the source type name."""
    t = col.type_name.lower()
    if t.endswith("[]"):
        return "array"
    base = t.split("(")[0].strip()
    if base in (
        "smallint",
        "integer",
        "bigint",
        "int2",
        "int4",
        "int8",
        "smallserial",
        "serial",
        "bigserial",
        "int",
        "tinyint",
        "mediumint",
    ):
        return "int"
    if base in ("boolean", "bool"):
        return "bool"
    if base in ("real", "double precision", "float4", "float8", "float", "double"):
        return "float"
    if base in ("bytea", "blob", "longblob", "mediumblob", "varbinary", "binary"):
        return "bytes"
    if base in ("json", "jsonb"):
        return "json"
    return "text"


def scalar_text(v: Any) -> Any:
    if v is None or isinstance(v, (int, float, str, bytes)):
        return v  # bool is an int
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (dict, list, tuple)):
        return to_json(v)
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return str(v)


# The text path hands these converters the stored form already: a str goes through first.
def _iso_space(v: Any) -> Any:
    if type(v) is str:
        return v
    return v.isoformat(sep=" ") if isinstance(v, dt.datetime) else scalar_text(v)


def _iso(v: Any) -> Any:
    if type(v) is str:
        return v
    return v.isoformat() if isinstance(v, (dt.date, dt.time)) else scalar_text(v)


def _decimal_text(v: Any) -> Any:
    if type(v) is str:
        return v
    return str(v) if isinstance(v, decimal.Decimal) else scalar_text(v)


def _json_value(v: Any) -> Any:
    # A JSON number beyond 64 bits (a jsonb scalar): SQLite cannot bind it; stored as the text a
    # smaller integer gets from the column's TEXT affinity.
    if type(v) is int and not -(2**63) <= v < 2**63:
        return str(v)
    return scalar_text(v)


def sqlite_converter(col: Column | None) -> Any:
    """The value converter for one column on SQLite staging; None when values go as they are.

    Every specialised converter falls back to :func:`scalar_text` for an unexpected value
    type, so the stored form is always the same as the generic path would give.
    """
    if col is None:
        return scalar_text
    cat = column_category(col)
    if cat in ("int", "float", "bytes"):
        return None
    if cat == "json":
        return _json_value
    base = col.type_name.lower().split("(")[0].strip()
    if base in ("text", "character varying", "character", "varchar", "char", "bpchar", "name"):
        return None  # psycopg hands these over as str already
    if base.startswith("timestamp"):
        return _iso_space
    if base in ("date", "time", "time without time zone", "time with time zone"):
        return _iso
    if base in ("numeric", "decimal"):
        return _decimal_text
    return scalar_text


def py_params(
    cols: tuple[str, ...], convs: tuple[Any, ...], values: dict[str, Any]
) -> tuple[Any, ...]:
    """A mirror row's driver parameters: ``values[c]`` for each column of ``cols`` through its
    converter in ``convs`` (None: as it is). None and a ``str`` go through as they are: every
    SQLite converter above returns a str unchanged (it is the stored form already), and the
    text path hands most values over as one. ``params`` is this function's compiled twin
    (``replicator/staging/_rows.c``) when it is built."""
    return tuple(
        [
            v if f is None or v is None or type(v) is str else f(v)
            for v, f in zip([values[c] for c in cols], convs, strict=True)
        ]
    )


COMPILED_TWINS = os.environ.get("SYNC_DAEMON_PURE_DECODER", "") in ("", "0")
"""Whether the compiled twins (this module's ``params``, the pgoutput decoder in
:mod:`replicator.cdc.pgoutput`) are used when built: SYNC_DAEMON_PURE_DECODER=1 switches both
off."""

# The compiled twin of py_params, when it is built.
_compiled: Any = None
if COMPILED_TWINS:
    try:
        from replicator.staging import _rows as _compiled  # type: ignore[attr-defined,no-redef]
    except ImportError:  # built without a C compiler
        _compiled = None

params: Callable[[tuple[str, ...], tuple[Any, ...], dict[str, Any]], tuple[Any, ...]] = (
    _compiled.params if _compiled is not None else py_params
)


def sqlite_type(col: Column) -> str:
    return {"int": "INTEGER", "bool": "INTEGER", "float": "REAL", "bytes": "BLOB"}.get(
        column_category(col), "TEXT"
    )


def pg_type(col: Column) -> str:
    # Built-in types are recreated as they are; user-defined ones (enums, domains) as text.
    if col.type_oid and col.type_oid >= BUILTIN_OID_LIMIT:
        return "text"
    return col.type_name or "text"


def pg_param(col: Column | None, v: Any) -> Any:
    """A value as a PostgreSQL staging parameter for ``col`` (JSON wrapped, user types as text)."""
    if v is None or col is None:
        return v
    if column_category(col) == "json":
        return Jsonb(v) if col.type_name.lower() == "jsonb" else Json(v)
    if col.type_oid and col.type_oid >= BUILTIN_OID_LIMIT:
        return v if isinstance(v, str) else to_json(v)
    return v


def utc(t: dt.datetime) -> dt.datetime:
    """A time as aware UTC: SQLite hands DateTime back naive, and everything stored is UTC."""
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


# ---------------------------------------------------------------------------- text values
TextAdapter = Callable[[bytes], Any]

_OID_DATE, _OID_TIME, _OID_TIMESTAMP, _OID_TIMESTAMPTZ = 1082, 1083, 1114, 1184
_OID_NUMERIC, _OID_UUID = 1700, 2950
# Zeros to append to a fraction of ``n`` digits: isoformat always writes six, PostgreSQL
# drops the trailing zeros.
_FRACTION_PAD = ("", "00000", "0000", "000", "00", "0", "")


def _iso_shape(v: bytes, n: int) -> bool:
    """``v`` (``n`` bytes) starts like an ISO date with a four-digit year ("2024-01-31") and ends
    with a digit: not 'infinity', not a BC date (" BC"), not another DateStyle, not a year past
    9999 — the texts the psycopg loaders either refuse or that need their parsing."""
    return n >= 10 and v[4] == 45 and 48 <= v[n - 1] <= 57 and (n == 10 or v[10] == 32)


def _sqlite_numeric(load: Callable[[bytes], Any]) -> TextAdapter:
    def numeric(v: bytes) -> Any:
        # str(Decimal) equals the text except NaN/Infinity (not ending in a digit: the loader
        # maps them) and values whose adjusted exponent is below -6, which str(Decimal) writes
        # in scientific form ("1E-7", "0E-8"); those all contain "0.000000".
        if 48 <= v[-1] <= 57 and b"0.000000" not in v:
            return v.decode()
        return load(v)

    return numeric


def _sqlite_timestamp(load: Callable[[bytes], Any]) -> TextAdapter:
    def timestamp(v: bytes) -> Any:
        # _iso_shape written out: this runs once a value.
        n = len(v)
        if n >= 19 and v[4] == 45 and v[10] == 32 and 48 <= v[n - 1] <= 57:
            if n == 19:
                return v.decode()
            if 21 <= n <= 26 and v[19] == 46:
                return v.decode() + _FRACTION_PAD[n - 20]
        return load(v)

    return timestamp


def _sqlite_timestamptz(load: Callable[[bytes], Any]) -> TextAdapter:
    # The loader returns the time in UTC (it has no connection, so no session time zone) and
    # isoformat writes "+00:00": a text already at offset +00 only needs the fraction padded
    # and the offset written out; any other offset is converted by the loader.
    def timestamptz(v: bytes) -> Any:
        n = len(v)
        # _iso_shape written out
        if n >= 22 and v[n - 3 :] == b"+00" and v[4] == 45 and v[10] == 32:
            if n == 22:
                return v[:19].decode() + "+00:00"
            if 24 <= n <= 29 and v[19] == 46:
                return v[: n - 3].decode() + _FRACTION_PAD[n - 23] + "+00:00"
        return load(v)

    return timestamptz


def _sqlite_date(load: Callable[[bytes], Any]) -> TextAdapter:
    def date(v: bytes) -> Any:
        return v.decode() if len(v) == 10 and _iso_shape(v, 10) else load(v)

    return date


def _sqlite_time(load: Callable[[bytes], Any]) -> TextAdapter:
    def time(v: bytes) -> Any:
        # "24:00:00" is a valid PostgreSQL time that Python's time cannot hold: it is left to
        # the loader (see replicator.pgvalues), so both paths store the same.
        n = len(v)
        if n >= 8 and v[2] == 58 and v[:2] < b"24":
            if n == 8:
                return v.decode()
            if 10 <= n <= 15 and v[8] == 46:
                return v.decode() + _FRACTION_PAD[n - 9]
        return load(v)

    return time


def _uuid(load: Callable[[bytes], Any]) -> TextAdapter:
    def uuid_text(v: bytes) -> Any:
        # PostgreSQL writes a uuid lowercase with hyphens, as str(UUID) does.
        return v.decode() if len(v) == 36 else load(v)

    return uuid_text


def _pg_text(load: Callable[[bytes], Any]) -> TextAdapter:
    def numeric(v: bytes) -> Any:
        return v.decode()  # numeric's input reads its own output, NaN and Infinity included

    return numeric


def _pg_temporal(load: Callable[[bytes], Any]) -> TextAdapter:
    def temporal(v: bytes) -> Any:
        # The server reads back the ISO text exactly (an offset too, so the same instant);
        # infinity, BC and years past 9999 keep the loader (which refuses them today).
        return v.decode() if _iso_shape(v, len(v)) else load(v)

    return temporal


def _pg_time(load: Callable[[bytes], Any]) -> TextAdapter:
    def time(v: bytes) -> Any:
        return v.decode() if len(v) >= 8 and v[2] == 58 and v[:2] < b"24" else load(v)

    return time


_TEXT_ADAPTERS: dict[str, dict[int, Callable[[Callable[[bytes], Any]], TextAdapter]]] = {
    "sqlite": {
        _OID_NUMERIC: _sqlite_numeric,
        _OID_TIMESTAMP: _sqlite_timestamp,
        _OID_TIMESTAMPTZ: _sqlite_timestamptz,
        _OID_DATE: _sqlite_date,
        _OID_TIME: _sqlite_time,
        _OID_UUID: _uuid,
    },
    "postgresql": {
        _OID_NUMERIC: _pg_text,
        _OID_TIMESTAMP: _pg_temporal,
        _OID_TIMESTAMPTZ: _pg_temporal,
        _OID_DATE: _pg_temporal,
        _OID_TIME: _pg_time,
        _OID_UUID: _uuid,
    },
}
"""Per staging dialect, the types whose stored form comes straight from the text. The others
keep the loader: ints, floats, text, bool, bytea and enums because the loader already yields the
stored form at C speed; json/jsonb because the stored form is json.dumps of the parsed value
(other spacing, floats rounded: "1.10" becomes 1.1), which the text is not; arrays, interval and
timetz because their stored form needs the parse; and every type not listed."""


# The compiled decoder's number for each adapter above whose fast branch it also has (``row`` in
# replicator/cdc/_pgoutput.c, same numbers there): it runs that branch in C and calls the adapter
# for every other text, so the values are the adapter's either way; 0 means "call the adapter".
_FAST_KIND: dict[Callable[[Callable[[bytes], Any]], TextAdapter], int] = {
    _sqlite_numeric: 1,
    _sqlite_timestamp: 2,
    _sqlite_timestamptz: 3,
    _sqlite_date: 4,
    _sqlite_time: 5,
    _uuid: 6,
    _pg_text: 7,
    _pg_temporal: 8,
    _pg_time: 9,
}

FAST_KINDS: dict[str, dict[int, int]] = {
    dialect: {oid: _FAST_KIND.get(make, 0) for oid, make in adapters.items()}
    for dialect, adapters in _TEXT_ADAPTERS.items()
}
"""Per staging dialect and type oid, the compiled decoder's number of its text adapter."""


def text_adapter_kind(type_oid: int, dialect: str) -> int:
    """The compiled decoder's number for :func:`text_adapter`'s adapter of ``type_oid`` on
    ``dialect`` staging (see :data:`FAST_KINDS`); 0 when it has none."""
    return FAST_KINDS.get(dialect, {}).get(type_oid, 0)


def text_adapter(type_oid: int, dialect: str, load: Callable[[bytes], Any]) -> TextAdapter | None:
    """An adapter from PostgreSQL's text output of ``type_oid`` to the value to store on
    ``dialect`` staging, falling back to ``load`` (the psycopg loader) for texts it does not
    take; None when the loader is the way for that type."""
    make = _TEXT_ADAPTERS.get(dialect, {}).get(type_oid)
    return make(load) if make is not None else None
