"""The pure-Python pgoutput decoder: valid messages decode to what was encoded; truncated and
hostile ones raise ProtocolError naming the offset, never IndexError or struct.error."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.cdc import pgoutput
from replicator.cdc.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Keepalive,
    LogicalMessage,
    Origin,
    ProtocolError,
    Relation,
    RelationColumn,
    RowChange,
    Truncate,
    TypeMsg,
    XLogData,
)
from tests.pgoutput_frames import copy_frame, cstr, messages, mutated, tuple_data

decode = pgoutput.pure_decode_message
parse = pgoutput.pure_parse_copy_message


def test_every_message_type_decodes() -> None:
    tup = tuple_data([b"42", None, "u", ("b", b"\x00\x01")])
    rel = struct.pack("!I", 16384)
    assert decode(b"I" + rel + b"N" + tup) == RowChange(
        "I", 16384, [b"42", None, UNCHANGED, b"\x00\x01"], None, False
    )
    key = tuple_data([b"1"])
    assert decode(b"U" + rel + b"K" + key + b"N" + tup).old == [b"1"]
    assert decode(b"U" + rel + b"O" + key + b"N" + tup).old_is_key is False
    assert decode(b"U" + rel + b"N" + tup) == RowChange(
        "U", 16384, [b"42", None, UNCHANGED, b"\x00\x01"], None, False
    )
    assert decode(b"D" + rel + b"K" + key) == RowChange("D", 16384, None, [b"1"], True)
    assert decode(b"B" + struct.pack("!QqI", 7, -5, 9)) == Begin(7, -5, 9)
    assert decode(b"C\x00" + struct.pack("!QQq", 1, 2, 3)) == Commit(0, 1, 2, 3)
    relmsg = b"R" + rel + cstr("") + cstr("items") + b"d" + struct.pack("!H", 2)
    relmsg += b"\x01" + cstr("id") + struct.pack("!Ii", 20, -1)
    relmsg += b"\x00" + cstr("naïve") + struct.pack("!Ii", 25, 8)
    assert decode(relmsg) == Relation(
        16384,
        "public",
        "items",
        "d",
        [RelationColumn("id", 20, -1, True), RelationColumn("naïve", 25, 8, False)],
    )
    assert decode(b"T" + struct.pack("!I", 2) + b"\x03" + struct.pack("!II", 5, 6)) == Truncate(
        [5, 6], True, True
    )
    assert decode(b"Y" + rel + cstr("s") + cstr("mood")) == TypeMsg(16384, "s", "mood")
    msg = b"M\x01" + struct.pack("!Q", 99) + cstr("p") + struct.pack("!I", 3) + b"abc"
    assert decode(msg) == LogicalMessage(True, 99, "p", b"abc")
    assert decode(b"O" + struct.pack("!Q", 4) + cstr("origin")) == Origin(4, "origin")


def test_copy_frames() -> None:
    frame = parse(b"w" + struct.pack("!QQQ", 1, 2, 3) + b"payload")
    assert isinstance(frame, XLogData)
    assert (frame.wal_start, frame.wal_end, frame.send_time) == (1, 2, 3)
    assert bytes(frame.payload) == b"payload"
    assert parse(b"k" + struct.pack("!QQ", 5, 6) + b"\x01") == Keepalive(5, 6, True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty pgoutput message"),
        (b"I\x00\x00", "truncated message: 4 bytes needed at offset 1, 3 in all"),
        (b"I\x00\x00\x00\x01N", "truncated message: 2 bytes needed at offset 6, 6 in all"),
        (
            b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x09ab",
            "truncated message: 9 bytes needed at offset 13, 15 in all",
        ),
        (b"I\x00\x00\x00\x01N\x00\x01x", "unknown tuple data kind 'x' at offset 8"),
        (b"U\x00\x00\x00\x01Z", "update message without new tuple (offset 5)"),
        (b"R\x00\x00\x00\x01abc", "unterminated string at offset 5"),
        (b"Y\x00\x00\x00\x01\xff\x00", "invalid UTF-8 in the string at offset 5"),
        (
            b"T\xff\xff\xff\xff\x00",
            "truncated message: 17179869180 bytes needed at offset 6, 6 in all",
        ),
        (b"Q", "unknown pgoutput message type 'Q'"),
    ],
)
def test_hostile_messages_raise_protocol_error(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(data)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


def test_hostile_copy_frames() -> None:
    for data, message in [
        (b"", "empty replication message"),
        (b"w\x00", "truncated message: 24 bytes needed at offset 1, 2 in all"),
        (b"k" + bytes(16), "truncated message: 17 bytes needed at offset 1, 17 in all"),
        (b"x", "unexpected replication message type 'x'"),
    ]:
        with pytest.raises(ProtocolError, match="^" + message.replace("(", r"\(") + "$"):
            parse(data)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_prefix_of_a_valid_message_decodes_or_raises_protocol_error(data: bytes) -> None:
    decode(data)
    for cut in range(len(data)):
        with contextlib.suppress(ProtocolError):
            decode(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.one_of(mutated(messages), mutated(copy_frame()), st.binary(max_size=64)))
def test_hostile_input_raises_protocol_error_only(data: bytes) -> None:
    for fn in (decode, parse):
        with contextlib.suppress(ProtocolError):
            fn(data)


def test_environment_forces_the_pure_decoder() -> None:
    env = {**os.environ, "SYNC_DAEMON_PURE_DECODER": "1"}
    code = "from replicator.cdc import pgoutput as p; print(p.DECODER, p.decode_message is p.pure_decode_message)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["pure", "True"]
    assert pgoutput.DECODER in ("pure", "compiled")
