"""Message format of the change stream, version 1 (see docs/scale-out.md for the reference).

One JSON object per journal entry, on subject ``{prefix}.{source}.{schema}.{table}``::

    {"v": 1, "op": "U", "source": "erp", "table": "public.items",
     "key": {"id": 7}, "row": {"id": 7, "sku": "A-7", ...},
     "position": "0/1A2B3C4", "journal_id": 1234, "staged_at": "2026-11-26 06:00:00+00:00"}

``op`` is ``U`` (row written: inserted or updated), ``D`` (row deleted; a key change is a ``D``
of the old key and a ``U`` of the new), ``T`` (table truncated) or ``schema`` (the table's
columns and key, published before the first change of a table and after every change of its
definition). ``row`` is the row as staging holds it when the entry is published; ``null``
when it was deleted since (a later ``D`` follows). Values are JSON: integers, floats and
booleans as such, numerics as decimal strings, timestamps ``YYYY-MM-DD HH:MM:SS[.ffffff]+HH:MM``,
dates and times ISO 8601, bytes ``\\x`` + hex, JSON columns as JSON.

The ``Nats-Msg-Id`` header is derived from the source position, the table, the operation and
the key, so a change published again after a crash carries the same id and JetStream drops it
inside its duplicate window.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from replicator.changes import Column, TableSchema
from replicator.staging import column_category, scalar_text, to_json

VERSION = 1


def subject(prefix: str, source: str, table: str) -> str:
    schema, _, name = table.partition(".")
    return f"{prefix}.{source or 'erp'}.{schema}.{name}"


def msg_id(source: str, position: str, table: str, op: str, key_text: str | None) -> str:
    digest = hashlib.sha1(f"{table}|{op}|{key_text or ''}".encode()).hexdigest()[:20]
    return f"{source or 'erp'}:{position}:{digest}"


def schema_msg_id(source: str, table: str, definition: str) -> str:
    digest = hashlib.sha1(definition.encode()).hexdigest()[:20]
    return f"{source or 'erp'}:schema:{table}:{digest}"


def _plain(v: Any) -> Any:
    if v is None or type(v) in (int, float, str, bool, dict, list):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    return scalar_text(v)  # decimals, timestamps, dates, UUIDs: as SQLite staging keeps them


def _json_column(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v  # SQLite staging keeps JSON as text


def _bool_column(v: Any) -> Any:
    return None if v is None else bool(v)  # SQLite staging keeps booleans as 0/1


def value_encoder(col: Column | None) -> Callable[[Any], Any]:
    """The function turning a staging value of ``col`` into its stream form."""
    cat = column_category(col) if col is not None else "text"
    return {"json": _json_column, "bool": _bool_column}.get(cat, _plain)


def wire_value(col: Column | None, v: Any) -> Any:
    """A staging value as the stream carries it (one form whatever the staging dialect)."""
    return value_encoder(col)(v)


def schema_payload(schema: TableSchema) -> dict[str, Any]:
    return {
        "columns": [
            {
                "name": c.name,
                "type_name": c.type_name,
                "type_oid": c.type_oid,
                "nullable": c.nullable,
            }
            for c in schema.columns
        ],
        "key": list(schema.key),
    }


def schema_from_payload(table: str, d: dict[str, Any]) -> TableSchema:
    schema, _, name = table.partition(".")
    return TableSchema(
        schema=schema,
        name=name,
        columns=tuple(Column(**c) for c in d["columns"]),
        key=tuple(d["key"]),
    )


def encode(message: dict[str, Any]) -> bytes:
    return to_json({"v": VERSION, **message}).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A message as a dict; raises ValueError naming what is wrong."""
    try:
        msg = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise ValueError(f"not a version {VERSION} change message")
    if msg.get("op") not in ("U", "D", "T", "schema") or not isinstance(msg.get("table"), str):
        raise ValueError(f"unknown op {msg.get('op')!r} or no table")
    return msg
