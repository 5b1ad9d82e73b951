"""Reading the rows of the mirrors: whole tables (verification), rows by key (the stream sink),
and the lookups the pushers make (a row by column values, columns of many rows, one column by
key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from replicator.db import reading
from replicator.staging.mirrors import MirrorInfo, Mirrors
from replicator.staging.values import key_json, scalar_text, to_json


class MirrorRows:
    """Reads of the mirrors of one store's catalogue."""

    def __init__(self, catalog: Mirrors) -> None:
        self.catalog = catalog
        self.db = catalog.db

    def rows_by_key(self, table: str, keys: Sequence[Sequence[Any]]) -> dict[str, dict[str, Any]]:
        """The current mirror rows of ``keys`` (:func:`key_json` of the key -> row as a dict);
        absent keys are rows deleted since."""
        info = self.catalog.get(table)
        if info is None or not keys:
            return {}
        q, p = self.db.q, self.db.ph
        names = [c.name for c in info.schema.columns]
        keycols = info.schema.key
        cols = ", ".join(q(c) for c in names)
        out: dict[str, dict[str, Any]] = {}
        with reading(self.db.engine) as conn:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                row_ph = "(" + ", ".join([p] * len(keycols)) + ")"
                where = (
                    f"({', '.join(q(k) for k in keycols)}) IN "
                    f"(VALUES {', '.join([row_ph] * len(chunk))})"
                )
                params = tuple(v for k in chunk for v in k)
                for r in conn.exec_driver_sql(
                    f"SELECT {cols} FROM {q(info.name)} WHERE {where}", params
                ):
                    row = dict(zip(names, r, strict=True))
                    out[str(key_json(tuple(row[k] for k in keycols)))] = row
        return out

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """All rows of a mirror, ordered by key (tests and the fault suite compare with the source)."""
        info = self.catalog.get(table)
        if info is None:
            self.catalog.load()
            info = self.catalog[table]
        cols = ", ".join(self.db.q(c.name) for c in info.schema.columns)
        order = ", ".join(self.db.q(k) for k in info.schema.key)
        with reading(self.db.engine) as conn:
            return [
                tuple(r)
                for r in conn.exec_driver_sql(
                    f"SELECT {cols} FROM {self.db.q(info.name)} ORDER BY {order}"
                )
            ]

    def checksum(self, table: str) -> tuple[int, str]:
        h = hashlib.sha256()
        rows = self.rows(table)
        for r in rows:
            h.update(to_json([scalar_text(v) for v in r]).encode())
        return len(rows), h.hexdigest()

    def select(self, table: str, where: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first row of a mirror whose columns equal ``where`` (all columns, as a dict);
        None when there is none or the table is not mirrored."""
        info = self.catalog.find(table)
        if info is None:
            return None
        q, p = self.db.q, self.db.ph
        cond = " AND ".join(f"{q(k)} = {p}" for k in where)
        names = [c.name for c in info.schema.columns]
        with reading(self.db.engine) as conn:
            row = conn.exec_driver_sql(
                f"SELECT {', '.join(q(c) for c in names)} FROM {q(info.name)} WHERE {cond}",
                tuple(self.db.to_storage(v) for v in where.values()),
            ).fetchone()
        return None if row is None else dict(zip(names, row, strict=True))

    def column_rows(
        self,
        info: MirrorInfo,
        columns: Sequence[str],
        *,
        where_in: tuple[str, Sequence[Any]] | None = None,
        chunk: int = 500,
    ) -> Iterable[Sequence[Any]]:
        """Rows of ``columns`` of a mirror: all of them, or those whose column ``where_in[0]``
        is one of ``where_in[1]`` (asked ``chunk`` values at a time)."""
        q, p = self.db.q, self.db.ph
        base = f"SELECT {', '.join(q(c) for c in columns)} FROM {q(info.name)}"
        with reading(self.db.engine) as conn:
            if where_in is None:
                yield from conn.exec_driver_sql(base)
                return
            column, values = where_in
            for i in range(0, len(values), chunk):
                part = list(values[i : i + chunk])
                yield from conn.exec_driver_sql(
                    f"{base} WHERE {q(column)} IN ({', '.join([p] * len(part))})", tuple(part)
                )

    def column_by_key(
        self, info: MirrorInfo, column: str, keys: Sequence[Sequence[Any]]
    ) -> list[tuple[bool, Any]]:
        """For each row key, whether the row exists and its value of ``column``."""
        q, p = self.db.q, self.db.ph
        where = " AND ".join(f"{q(k)} = {p}" for k in info.schema.key)
        sql = f"SELECT {q(column)} FROM {q(info.name)} WHERE {where}"
        out: list[tuple[bool, Any]] = []
        with reading(self.db.engine) as conn:
            for k in keys:
                row = conn.exec_driver_sql(sql, tuple(k)).fetchone()
                out.append((False, None) if row is None else (True, row[0]))
        return out
