"""Decoding of the replication stream: CopyBoth framing and pgoutput (protocol version 1) messages.

Framing (``XLogData`` 'w', primary keepalive 'k', standby status update 'r') and the logical
messages of the ``pgoutput`` plugin: Begin, Commit, Origin, Relation, Type, Insert, Update,
Delete, Truncate and Message (``pg_logical_emit_message``). Column values arrive in text form and
are turned into Python values by psycopg's own text loaders, so every type psycopg knows
(numeric, timestamps, uuid, json, bytea, arrays…) decodes as psycopg would decode a query result;
unknown types (enums, domains of unknown base) stay ``str``.

Reference: PostgreSQL docs, "Logical Streaming Replication Protocol" / "Message Formats".
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass
from typing import Any

from psycopg import adapt, pq

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_UNIX_TO_PG_US = 946_684_800_000_000

_Q = struct.Struct("!Q")
_qqq = struct.Struct("!QQQ")
_I = struct.Struct("!I")
_H = struct.Struct("!H")

UNCHANGED = object()  # an unchanged TOAST value ('u'): keep what staging has


def lsn_to_int(lsn: str) -> int:
    hi, _, lo = lsn.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(v: int) -> str:
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def pg_time_to_datetime(us: int) -> dt.datetime:
    return PG_EPOCH + dt.timedelta(microseconds=us)


def now_pg_us() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1_000_000) - _UNIX_TO_PG_US


def standby_status(written: int, flushed: int, applied: int, reply: bool = False) -> bytes:
    """A Standby Status Update ('r') message."""
    return b"r" + struct.pack("!QQQQB", written, flushed, applied, now_pg_us(), 1 if reply else 0)


@dataclass(slots=True)
class XLogData:
    wal_start: int
    wal_end: int
    send_time: int
    payload: memoryview


@dataclass(slots=True)
class Keepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_copy_message(buf: memoryview | bytes) -> XLogData | Keepalive:
    kind = buf[0]
    if kind == 0x77:  # 'w'
        start, end, sent = _qqq.unpack_from(buf, 1)
        return XLogData(start, end, sent, memoryview(buf)[25:])
    if kind == 0x6B:  # 'k'
        end, sent = struct.unpack_from("!QQ", buf, 1)
        return Keepalive(end, sent, bool(buf[17]))
    raise ValueError(f"unexpected replication message type {chr(kind)!r}")


# ---------------------------------------------------------------------------- pgoutput messages
@dataclass(slots=True)
class Begin:
    final_lsn: int
    commit_time: int
    xid: int


@dataclass(slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(slots=True)
class RelationColumn:
    name: str
    type_oid: int
    type_mod: int
    is_key: bool


@dataclass(slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: list[RelationColumn]

    @property
    def qualified(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass(slots=True)
class TypeMsg:
    oid: int
    namespace: str
    name: str


@dataclass(slots=True)
class RowChange:
    """Insert ('I'), Update ('U') or Delete ('D'); tuples are raw (bytes | None | UNCHANGED)."""

    op: str
    relation_oid: int
    new: list[Any] | None
    old: list[Any] | None
    old_is_key: bool


@dataclass(slots=True)
class Truncate:
    relation_oids: list[int]
    cascade: bool
    restart_identity: bool


@dataclass(slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(slots=True)
class Origin:
    lsn: int
    name: str


Message = Begin | Commit | Relation | TypeMsg | RowChange | Truncate | LogicalMessage | Origin


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode("utf-8"), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[list[Any], int]:
    (n,) = _H.unpack_from(buf, pos)
    pos += 2
    out: list[Any] = []
    append = out.append
    for _ in range(n):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't' text
            (ln,) = _I.unpack_from(buf, pos)
            pos += 4
            append(buf[pos : pos + ln])
            pos += ln
        elif kind == 0x6E:  # 'n' null
            append(None)
        elif kind == 0x75:  # 'u' unchanged toast
            append(UNCHANGED)
        elif kind == 0x62:  # 'b' binary (protocol 2+ with binary option; not requested)
            (ln,) = _I.unpack_from(buf, pos)
            pos += 4
            append(buf[pos : pos + ln])
            pos += ln
        else:
            raise ValueError(f"unknown tuple data kind {chr(kind)!r}")
    return out, pos


def decode_message(data: memoryview | bytes) -> Message:
    """Decode one pgoutput message (the payload of an XLogData frame)."""
    buf = bytes(data)
    kind = buf[0]
    if kind == 0x49:  # 'I'
        (rel,) = _I.unpack_from(buf, 1)
        new, _ = _tuple(buf, 6)  # 5 is 'N'
        return RowChange("I", rel, new, None, False)
    if kind == 0x55:  # 'U'
        (rel,) = _I.unpack_from(buf, 1)
        pos = 5
        old = None
        old_is_key = False
        marker = buf[pos]
        if marker in (0x4B, 0x4F):  # 'K' | 'O'
            old_is_key = marker == 0x4B
            old, pos = _tuple(buf, pos + 1)
            marker = buf[pos]
        if marker != 0x4E:
            raise ValueError("update message without new tuple")
        new, _ = _tuple(buf, pos + 1)
        return RowChange("U", rel, new, old, old_is_key)
    if kind == 0x44:  # 'D'
        (rel,) = _I.unpack_from(buf, 1)
        old_is_key = buf[5] == 0x4B
        old, _ = _tuple(buf, 6)
        return RowChange("D", rel, None, old, old_is_key)
    if kind == 0x42:  # 'B'
        final_lsn, ts = struct.unpack_from("!Qq", buf, 1)
        (xid,) = _I.unpack_from(buf, 17)
        return Begin(final_lsn, ts, xid)
    if kind == 0x43:  # 'C'
        flags = buf[1]
        commit_lsn, end_lsn, ts = struct.unpack_from("!QQq", buf, 2)
        return Commit(flags, commit_lsn, end_lsn, ts)
    if kind == 0x52:  # 'R'
        (oid,) = _I.unpack_from(buf, 1)
        ns, pos = _cstring(buf, 5)
        name, pos = _cstring(buf, pos)
        ident = chr(buf[pos])
        (ncols,) = _H.unpack_from(buf, pos + 1)
        pos += 3
        cols = []
        for _ in range(ncols):
            flags = buf[pos]
            cname, pos = _cstring(buf, pos + 1)
            toid, tmod = struct.unpack_from("!Ii", buf, pos)
            pos += 8
            cols.append(RelationColumn(cname, toid, tmod, bool(flags & 1)))
        return Relation(oid, ns or "public", name, ident, cols)
    if kind == 0x54:  # 'T'
        (n,) = _I.unpack_from(buf, 1)
        opts = buf[5]
        oids = list(struct.unpack_from(f"!{n}I", buf, 6))
        return Truncate(oids, bool(opts & 1), bool(opts & 2))
    if kind == 0x59:  # 'Y'
        (oid,) = _I.unpack_from(buf, 1)
        ns, pos = _cstring(buf, 5)
        name, _ = _cstring(buf, pos)
        return TypeMsg(oid, ns, name)
    if kind == 0x4D:  # 'M'
        flags = buf[1]
        (lsn,) = _Q.unpack_from(buf, 2)
        prefix, pos = _cstring(buf, 10)
        (ln,) = _I.unpack_from(buf, pos)
        return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos + 4 : pos + 4 + ln])
    if kind == 0x4F:  # 'O'
        (lsn,) = _Q.unpack_from(buf, 1)
        name, _ = _cstring(buf, 9)
        return Origin(lsn, name)
    raise ValueError(f"unknown pgoutput message type {chr(kind)!r}")


class ValueDecoder:
    """Turns raw text column values into Python values with psycopg's text loaders."""

    def __init__(self, context: Any = None) -> None:
        self._tx = adapt.Transformer(context)
        self._loaders: dict[int, Any] = {}
        self._plans: dict[int, tuple[Relation, list[tuple[str, Any]]]] = {}

    def loader(self, oid: int) -> Any:
        ld = self._loaders.get(oid)
        if ld is None:
            ld = self._loaders[oid] = self._tx.get_loader(oid, pq.Format.TEXT).load
        return ld

    def row(self, rel: Relation, raw: list[Any]) -> dict[str, Any]:
        """Column name -> value, leaving out unchanged TOAST columns."""
        plan = self._plans.get(id(rel))
        if plan is None or plan[0] is not rel:
            plan = (rel, [(c.name, self.loader(c.type_oid)) for c in rel.columns])
            self._plans[id(rel)] = plan
        out: dict[str, Any] = {}
        for (name, load), v in zip(plan[1], raw, strict=False):
            if v is None:
                out[name] = None
            elif v is not UNCHANGED:
                out[name] = load(v)
        return out
