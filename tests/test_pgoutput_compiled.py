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
from replicator.staging.values import FAST_KINDS, text_adapter, text_adapter_kind
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
    plan = tuple((n, bytes.hex, 0) for n in names)
    got = compiled.row(plan, raw)
    want = pgoutput.pure_row(plan, raw)
    assert list(got.items()) == list(want.items())
    assert pgoutput._row is compiled.row

    def boom(v: bytes) -> None:
        raise ValueError(v)

    bad = tuple((n, boom, 0) for n in names)
    if any(v is not None and v is not pgoutput.UNCHANGED for v in raw[: len(names)]):
        with pytest.raises(ValueError):
            compiled.row(bad, raw)
    with pytest.raises(TypeError):
        compiled.row(list(plan), raw)
    if names and raw and raw[0] is not None and raw[0] is not pgoutput.UNCHANGED:
        with pytest.raises(TypeError):  # a pair, as a module built before the kinds took
            compiled.row(((names[0], bytes.hex),), raw)


# The texts the fast kinds are about: PostgreSQL's output of each type, and near misses of
# every check their fast branch makes (lengths, separators, fractions of 1-9 digits, offsets,
# infinity, BC, 24:00, years past 9999, scientific numerics, bytes that are not UTF-8).
_dates = st.sampled_from(
    [b"2026-11-26", b"0001-01-01", b"12345-01-01", b"infinity", b"-infinity", b"2026-11-2x"]
)
_times = st.sampled_from([b"17:42:55", b"00:00:00", b"24:00:00", b"23:59:60", b"7:42:55"])
_fractions = st.one_of(
    st.just(b""), st.text("0123456789", min_size=0, max_size=9).map(lambda d: b"." + d.encode())
)
_offsets = st.sampled_from([b"", b"+00", b"+02", b"-07:30", b"+00:00", b"+05:30:15", b"+0"])
_times_of_day = st.tuples(_times, _fractions, _offsets).map(b"".join)
_timestamps = st.tuples(
    _dates,
    st.one_of(st.just(b""), _times_of_day.map(lambda t: b" " + t), _times_of_day),
    st.sampled_from([b"", b" BC"]),
).map(b"".join)
_numerics = st.one_of(
    st.from_regex(r"-?[0-9]{1,12}(\.[0-9]{0,10})?", fullmatch=True).map(str.encode),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"0.0000001", b"1e5", b"-0.000000"]),
)
_uuids = st.uuids().flatmap(
    lambda u: st.sampled_from([str(u).encode(), str(u).upper().encode(), u.hex.encode()])
)
value_texts = st.one_of(
    _timestamps,
    _times_of_day,
    _numerics,
    _uuids,
    st.binary(max_size=40),
    st.sampled_from([b"", b"\xff" * 36, b"2026-11-26 17:42:55.\xc3\xa9+00"]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted({(d, oid) for d, kinds in FAST_KINDS.items() for oid in kinds})),
    st.lists(value_texts, min_size=1, max_size=4),
)
def test_fast_kinds_are_their_adapters(which: tuple[str, int], texts: list[bytes]) -> None:
    """For every text, a fast kind gives what its Python adapter gives — the same value of the
    same type, or the same error — so the compiled decoder stores what the pure one stores."""
    dialect, oid = which
    load = pgoutput.ValueDecoder().loader(oid)
    adapter = text_adapter(oid, dialect, load)
    assert adapter is not None
    kind = text_adapter_kind(oid, dialect)
    assert kind > 0
    for text in texts:
        plan = (("v", adapter, kind),)
        assert outcome_of(compiled.row, plan, [text]) == outcome_of(pgoutput.pure_row, plan, [text])


def test_fast_kinds_every_shape() -> None:
    """The same, for every combination of the shapes above (each length of fraction, each
    offset, with and without a time, BC…) and every kind: no example left to chance."""
    dates = [b"2026-11-26", b"0001-01-01", b"12345-01-01", b"infinity", b"2026-11-2x"]
    times = [b"17:42:55", b"00:00:00", b"24:00:00", b"7:42:55"]
    fractions = [b""] + [b"." + b"1234567809"[:n] for n in range(10)]
    offsets = [b"", b"+00", b"+02", b"-07:30", b"+00:00", b"+0"]
    of_day = [t + f + o for t in times for f in fractions for o in offsets]
    texts = (
        dates
        + of_day
        + [
            d + sep + t + bc
            for d in dates
            for sep in (b" ", b"T")
            for t in of_day
            for bc in (b"", b" BC")
        ]
        + [b"1", b"-1234.50", b"0.000000", b"10.0000001", b"NaN", b"-Infinity", b"", b"1e5"]
        + [b"6f1c0b4e-6f8a-4a4f-9e1e-2b7d1d0c9a11", b"6F1C0B4E-6F8A-4A4F-9E1E-2B7D1D0C9A11"]
    )
    for dialect, kinds in FAST_KINDS.items():
        for oid in kinds:
            adapter = text_adapter(oid, dialect, pgoutput.ValueDecoder().loader(oid))
            plan = (("v", adapter, text_adapter_kind(oid, dialect)),)
            for text in texts:
                want = outcome_of(pgoutput.pure_row, plan, [text])
                assert outcome_of(compiled.row, plan, [text]) == want, (dialect, oid, text)


def outcome_of(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    try:
        result = fn(*args)
    except Exception as e:  # the loaders' own errors, UnicodeDecodeError, IndexError …
        return ("error", type(e), str(e))
    return ("ok", {k: (type(v), repr(v)) for k, v in result.items()})  # NaN != NaN
