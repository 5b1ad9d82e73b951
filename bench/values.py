"""Micro-benchmark: a row's values from pgoutput text to what staging is handed, text path
against objects path (psycopg loaders), CPU per row.

The row is the one of ``bench/logical_replication.py`` — ``bench (id bigint, sku text, qty int,
price numeric(12,2), at timestamptz)`` — as pgoutput carries it (texts, offset +00). Per row:
:meth:`ValueDecoder.row`, then what the apply path does to the values before the database sees
them: on SQLite the mirror's converter (``StagingStore.catalog.converter``); on PostgreSQL the
same, then psycopg's COPY formatting of the row (``Transformer.dump_sequence`` as COPY does),
without sending it. Both paths run interleaved, ``--repeat`` times; the figure is the best
process CPU time (``time.process_time``), so other load on the machine disturbs it less than a
wall clock. Nothing is asserted.

Usage: python bench/values.py [--rows 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psycopg import adapt  # noqa: E402

from replicator.cdc.pgoutput import Relation, RelationColumn, ValueDecoder  # noqa: E402
from replicator.changes import Column, TableSchema  # noqa: E402
from replicator.staging import StagingStore  # noqa: E402

COLUMNS = [
    ("id", "bigint", 20),
    ("sku", "text", 25),
    ("qty", "integer", 23),
    ("price", "numeric(12,2)", 1700),
    ("at", "timestamp with time zone", 1184),
]
SCHEMA = TableSchema("public", "bench", tuple(Column(n, t, o) for n, t, o in COLUMNS), ("id",))
REL = Relation(
    1, "public", "bench", "d", [RelationColumn(n, o, -1, n == "id") for n, _, o in COLUMNS]
)


def rows(n: int) -> list[list[Any]]:
    return [
        [
            str(i).encode(),
            f"SKU-{i}".encode(),
            str(i % 100).encode(),
            f"{i // 100}.{i % 100:02d}".encode(),
            b"2026-11-26 13:56:12.%06d+00" % (i % 1_000_000)
            if i % 4
            else b"2026-11-26 13:56:12+00",
        ]
        for i in range(1, n + 1)
    ]


def run(dialect: str, converter: Any, raw: list[list[Any]], text_values: bool) -> float:
    dec = ValueDecoder(dialect=dialect, schema_of=lambda rel: SCHEMA, text_values=text_values)
    row = dec.row
    dump = None
    if dialect == "postgresql":
        tx = adapt.Transformer()
        formats = [adapt.PyFormat.TEXT] * len(COLUMNS)
        dump = tx.dump_sequence
    t0 = time.process_time()
    for r in raw:
        params = converter(row(REL, r))
        if dump is not None:
            dump(params, formats)
    return (time.process_time() - t0) / len(raw) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    raw = rows(args.rows)
    cols = tuple(n for n, _, _ in COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        store = StagingStore(f"sqlite:///{Path(tmp) / 's.db'}")
        store.setup()
        info = store.ensure_mirror(SCHEMA)
        sqlite_conv = store.catalog.converter(info, cols)
        store.dispose()
    # The PostgreSQL converter passes these columns as they are (no JSON, no user types).
    pg_conv = lambda values: tuple(values[c] for c in cols)  # noqa: E731
    print(f"{args.rows:,} rows of {', '.join(t for _, t, _ in COLUMNS)}; best of {args.repeat}")
    for dialect, conv in (("sqlite", sqlite_conv), ("postgresql", pg_conv)):
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.repeat):
            for text_values in (False, True):
                best[text_values] = min(best[text_values], run(dialect, conv, raw, text_values))
        print(
            f"  {dialect:10s} objects {best[False]:5.2f} us/row   text {best[True]:5.2f} us/row   "
            f"saved {best[False] - best[True]:5.2f} us/row ({1 - best[True] / best[False]:.0%})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
