"""Micro-benchmark: decoding pgoutput row messages, pure Python against the compiled decoder.

Frames are built in memory (no server): XLogData frames carrying Insert, Update (with an old key)
and Delete messages of a ``big (id bigint, sku text, qty int, price numeric)`` row, the table of
the large-transaction benchmark. Each decoder decodes the same frames the way the capture loop
does (``parse_copy_message`` then ``decode_message``); the figure is the best of a few runs,
in µs per row message. Nothing is asserted: figures are printed side by side.

Usage: python bench/decoder.py [--rows 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicator.cdc import pgoutput  # noqa: E402 - after the path set-up above


def _tuple(values: list[bytes | None]) -> bytes:
    out = [struct.pack("!H", len(values))]
    for v in values:
        out.append(b"n" if v is None else b"t" + struct.pack("!I", len(v)) + v)
    return b"".join(out)


def _row(i: int) -> list[bytes | None]:
    return [
        str(i).encode(),
        f"SKU-{i:08d}".encode(),
        str(i % 97).encode(),
        f"{i % 1000}.25".encode(),
    ]


def frames(rows: int) -> list[bytes]:
    """XLogData frames: a third inserts, a third updates (old key), a third deletes."""
    out = []
    for i in range(rows):
        head = b"w" + struct.pack("!QQQ", i, i + 1, 0)
        rel = struct.pack("!I", 16384)
        if i % 3 == 0:
            msg = b"I" + rel + b"N" + _tuple(_row(i))
        elif i % 3 == 1:
            msg = b"U" + rel + b"K" + _tuple([str(i).encode(), None, None, None])
            msg += b"N" + _tuple(_row(i))
        else:
            msg = b"D" + rel + b"K" + _tuple([str(i).encode(), None, None, None])
        out.append(head + msg)
    return out


def run(
    data: list[bytes],
    parse: Callable[[Any], Any],
    decode: Callable[[Any], Any],
    repeat: int,
) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in data:
            decode(parse(f).payload)
        best = min(best, time.perf_counter() - t0)
    return best / len(data) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data = frames(args.rows)
    print(f"decoder in use: {getattr(pgoutput, 'DECODER', 'pure')}")
    pure = run(
        data,
        getattr(pgoutput, "pure_parse_copy_message", pgoutput.parse_copy_message),
        getattr(pgoutput, "pure_decode_message", pgoutput.decode_message),
        args.repeat,
    )
    compiled_mod = getattr(pgoutput, "compiled", None)
    line = f"{args.rows:,} row messages: pure {pure:.2f} µs/row"
    if compiled_mod is None:
        line += ", compiled: not built"
    else:
        c = run(data, compiled_mod.parse_copy_message, compiled_mod.decode_message, args.repeat)
        line += f", compiled {c:.2f} µs/row ({pure / c:.1f}x)"
    print(line)


if __name__ == "__main__":
    main()
