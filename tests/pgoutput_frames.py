"""Encoders of pgoutput messages and CopyBoth frames for the decoder tests (the server's side).

Hypothesis strategies build valid messages of every type the decoder knows; the decoder tests
feed them, and truncated or mutated copies of them, to the pure and the compiled decoders.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
# Strings without NUL (a C string ends at the first one); any code point UTF-8 can carry.
names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
values = st.one_of(
    st.none(),
    st.just("u"),
    st.binary(max_size=20),
    st.tuples(st.just("b"), st.binary(max_size=8)),
)


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def tuple_data(vals: list[Any]) -> bytes:
    out = [struct.pack("!H", len(vals))]
    for v in vals:
        if v is None:
            out.append(b"n")
        elif v == "u":
            out.append(b"u")
        elif isinstance(v, tuple):
            out.append(b"b" + struct.pack("!I", len(v[1])) + v[1])
        else:
            out.append(b"t" + struct.pack("!I", len(v)) + v)
    return b"".join(out)


tuples = st.lists(values, max_size=6).map(tuple_data)
# A marker byte the decoder reads: mostly the expected ones, sometimes any byte.
any_byte = st.integers(0, 255).map(lambda b: bytes([b]))


@st.composite
def insert(draw: st.DrawFn) -> bytes:
    return b"I" + struct.pack("!I", draw(u32)) + draw(st.just(b"N") | any_byte) + draw(tuples)


@st.composite
def update(draw: st.DrawFn) -> bytes:
    old = draw(st.sampled_from([b"", b"K", b"O"]))
    msg = b"U" + struct.pack("!I", draw(u32))
    if old:
        msg += old + draw(tuples)
    return msg + b"N" + draw(tuples)


@st.composite
def delete(draw: st.DrawFn) -> bytes:
    return (
        b"D"
        + struct.pack("!I", draw(u32))
        + draw(st.sampled_from([b"K", b"O"]) | any_byte)
        + draw(tuples)
    )


@st.composite
def relation(draw: st.DrawFn) -> bytes:
    cols = draw(st.lists(st.tuples(st.integers(0, 255), names, u32, i32), max_size=5))
    msg = b"R" + struct.pack("!I", draw(u32)) + cstr(draw(names)) + cstr(draw(names))
    msg += draw(st.sampled_from([b"d", b"n", b"f", b"i"]) | any_byte) + struct.pack("!H", len(cols))
    for flags, name, oid, mod in cols:
        msg += bytes([flags]) + cstr(name) + struct.pack("!Ii", oid, mod)
    return msg


@st.composite
def begin(draw: st.DrawFn) -> bytes:
    return b"B" + struct.pack("!QqI", draw(u64), draw(i64), draw(u32))


@st.composite
def commit(draw: st.DrawFn) -> bytes:
    return (
        b"C"
        + bytes([draw(st.integers(0, 255))])
        + struct.pack("!QQq", draw(u64), draw(u64), draw(i64))
    )


@st.composite
def truncate(draw: st.DrawFn) -> bytes:
    oids = draw(st.lists(u32, max_size=5))
    opts = draw(st.integers(0, 255))
    return (
        b"T" + struct.pack("!I", len(oids)) + bytes([opts]) + struct.pack(f"!{len(oids)}I", *oids)
    )


@st.composite
def type_msg(draw: st.DrawFn) -> bytes:
    return b"Y" + struct.pack("!I", draw(u32)) + cstr(draw(names)) + cstr(draw(names))


@st.composite
def message(draw: st.DrawFn) -> bytes:
    content = draw(st.binary(max_size=20))
    head = b"M" + bytes([draw(st.integers(0, 255))]) + struct.pack("!Q", draw(u64))
    return head + cstr(draw(names)) + struct.pack("!I", len(content)) + content


@st.composite
def origin(draw: st.DrawFn) -> bytes:
    return b"O" + struct.pack("!Q", draw(u64)) + cstr(draw(names))


messages = st.one_of(
    insert(),
    update(),
    delete(),
    relation(),
    begin(),
    commit(),
    truncate(),
    type_msg(),
    message(),
    origin(),
)


@st.composite
def copy_frame(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return b"w" + struct.pack("!QQQ", draw(u64), draw(u64), draw(u64)) + draw(messages)
    return b"k" + struct.pack("!QQ", draw(u64), draw(u64)) + bytes([draw(st.integers(0, 255))])


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid frame with a few bytes overwritten, inserted or removed, or cut short."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        # mostly past the type byte: a message of an unknown type tells little
        first = 0 if draw(st.integers(0, 9)) == 0 else min(1, len(data))
        at = draw(st.integers(first, len(data)))
        if how == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            del data[at:]
    return bytes(data)
