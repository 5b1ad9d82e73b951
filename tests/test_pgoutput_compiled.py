"""The compiled pgoutput decoder gives exactly what the pure one gives.

Both are fed the same frames: generated valid messages of every type, every prefix of them, the
same frames with bytes overwritten, inserted or removed, and random bytes. For each input both
return equal objects of the same types, or both raise ProtocolError with the same message; the
compiled one never crashes the interpreter. Skipped when the extension is not built (no C
compiler at install time), with the reason.
"""

from __future__ import annotations

import gc
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.cdc import pgoutput
from tests.pgoutput_frames import copy_frame, cstr, messages, mutated, tuple_data

compiled = pgoutput.compiled
if compiled is None:
    why = (
        "the compiled decoder replicator.cdc._pgoutput is not built (no C compiler at "
        "`pip install -e .`), or SYNC_DAEMON_PURE_DECODER=1 turned it off"
    )
    pytest.skip(why, allow_module_level=True)


def outcome(fn: Callable[[Any], Any], data: Any) -> tuple[Any, ...]:
    try:
        result = fn(data)
    except pgoutput.ProtocolError as e:
        return ("error", str(e))
    return ("ok", shape(result), result)


def shape(obj: Any) -> Any:
    """The types inside a decoded object, so that equal-but-different-type values differ."""
    if isinstance(obj, list):
        return [shape(v) for v in obj]
    if hasattr(obj, "__slots__"):
        return (type(obj), [shape(getattr(obj, f)) for f in obj.__slots__])
    return type(obj)


def same(data: bytes) -> None:
    for buf in (data, memoryview(data), bytearray(data)):
        pure = outcome(pgoutput.pure_decode_message, buf)
        assert outcome(compiled.decode_message, buf) == pure, data
    frame_pure = outcome(pgoutput.pure_parse_copy_message, data)
    frame_c = outcome(compiled.parse_copy_message, data)
    if frame_pure[0] == "ok":
        # payload is a memoryview: compare what it holds
        assert frame_c[0] == "ok" and frame_c[1] == frame_pure[1]
        p, c = frame_pure[2], frame_c[2]
        assert [getattr(p, f) for f in p.__slots__] == [getattr(c, f) for f in c.__slots__]
        if isinstance(p, pgoutput.XLogData):
            same(bytes(p.payload))
    else:
        assert frame_c == frame_pure, data


def test_compiled_is_the_default() -> None:
    assert pgoutput.DECODER == "compiled"
    assert pgoutput.decode_message is compiled.decode_message
    # every class is built by filling its slots, not by calling it
    assert compiled.configured_fast() == 11


def test_objects_are_whole() -> None:
    tup = tuple_data([b"42", None, "u"])
    msg = b"U" + struct.pack("!I", 7) + b"K" + tuple_data([b"1"]) + b"N" + tup
    row = compiled.decode_message(msg)
    assert row == pgoutput.RowChange("U", 7, [b"42", None, pgoutput.UNCHANGED], [b"1"], True)
    assert row.new[2] is pgoutput.UNCHANGED
    row.op = "I"  # a normal, mutable instance
    assert repr(row).startswith("RowChange(op='I'")
    rel = compiled.decode_message(b"R" + struct.pack("!I", 1) + cstr("") + cstr("t") + b"d\x00\x00")
    assert rel.qualified == "public.t"
    del row, rel
    gc.collect()


def test_tuple_and_cstring_twins() -> None:
    buf = b"xx" + tuple_data([b"a", None, "u", ("b", b"\x01")]) + cstr("é") + b"zz"
    assert compiled.tuple_data(buf, 2) == pgoutput.pure_tuple(buf, 2)
    _, pos = pgoutput.pure_tuple(buf, 2)
    assert compiled.cstring(buf, pos) == pgoutput.pure_cstring(buf, pos)
    for pos in range(len(buf) + 3):
        for c_fn, py_fn in (
            (compiled.tuple_data, pgoutput.pure_tuple),
            (compiled.cstring, pgoutput.pure_cstring),
        ):
            assert outcome(lambda b, c_fn=c_fn, pos=pos: c_fn(b, pos), buf) == outcome(
                lambda b, py_fn=py_fn, pos=pos: py_fn(b, pos), buf
            )


@settings(max_examples=500, deadline=None)
@given(messages)
def test_valid_messages_and_every_prefix(data: bytes) -> None:
    assert outcome(pgoutput.pure_decode_message, data)[0] == "ok"
    for cut in range(len(data) + 1):
        same(data[:cut])


@settings(max_examples=300, deadline=None)
@given(copy_frame())
def test_copy_frames(data: bytes) -> None:
    same(data)
    for cut in range(0, len(data), 3):
        same(data[:cut])


@settings(max_examples=1000, deadline=None)
@given(st.one_of(mutated(messages), mutated(copy_frame())))
def test_mutated_frames(data: bytes) -> None:
    same(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes(data: bytes) -> None:
    same(data)


def test_huge_declared_lengths() -> None:
    rel = struct.pack("!I", 1)
    for data in [
        b"T\xff\xff\xff\xff\x00",
        b"I" + rel + b"N\xff\xff",
        b"I" + rel + b"Nt\x00\x01t\xff\xff\xff\xff",
        b"M\x00" + bytes(8) + b"\x00\xff\xff\xff\xff",
        b"R" + rel + b"\x00\x00d\xff\xff",
    ]:
        same(data)
        assert outcome(compiled.decode_message, data)[0] == "error"


def test_not_a_buffer() -> None:
    with pytest.raises(TypeError):
        compiled.decode_message("text")
    with pytest.raises(TypeError):
        compiled.tuple_data(b"", 0, 1)


raw_values = st.lists(
    st.one_of(st.none(), st.just(pgoutput.UNCHANGED), st.binary(max_size=6)), max_size=6
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=6), raw_values)
def test_row_twin(names: list[str], raw: list[Any]) -> None:
    """``row`` builds the same dict, in the same order, as the pure loop (names repeated,
    plan and row of different lengths), and passes a column function's error on."""
    plan = tuple((n, bytes.hex) for n in names)
    got = compiled.row(plan, raw)
    want = pgoutput.pure_row(plan, raw)
    assert list(got.items()) == list(want.items())
    assert pgoutput._row is compiled.row

    def boom(v: bytes) -> None:
        raise ValueError(v)

    bad = tuple((n, boom) for n in names)
    if any(v is not None and v is not pgoutput.UNCHANGED for v in raw[: len(names)]):
        with pytest.raises(ValueError):
            compiled.row(bad, raw)
    with pytest.raises(TypeError):
        compiled.row(list(plan), raw)
