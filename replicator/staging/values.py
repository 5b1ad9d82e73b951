"""How values are stored in staging: JSON text, row keys, column categories and types.

Capture sources hand over Python values (ints, Decimals, datetimes, UUIDs, dicts, lists,
bytes). On PostgreSQL staging they keep their types; on SQLite, numerics and temporal values are
stored as text in ISO/decimal form (never as REAL, which would round) and JSON and arrays as
JSON text. Every writer of mirror rows (the apply path, the spill, the stream consumer) goes
through these functions, so a value is stored the same way whichever path wrote it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
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


def _iso_space(v: Any) -> Any:
    return v.isoformat(sep=" ") if isinstance(v, dt.datetime) else scalar_text(v)


def _iso(v: Any) -> Any:
    return v.isoformat() if isinstance(v, (dt.date, dt.time)) else scalar_text(v)


def _decimal_text(v: Any) -> Any:
    return str(v) if isinstance(v, decimal.Decimal) else scalar_text(v)


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
