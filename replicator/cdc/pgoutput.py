"""Decoding of the replication stream: CopyBoth framing and pgoutput (protocol version 1) messages.

Framing (``XLogData`` 'w', primary keepalive 'k', standby status update 'r') and the logical
messages of the ``pgoutput`` plugin: Begin, Commit, Origin, Relation, Type, Insert, Update,
Delete, Truncate and Message (``pg_logical_emit_message``). Column values arrive in text form and
are turned into Python values by psycopg's own text loaders, so every type psycopg knows
(numeric, timestamps, uuid, json, bytea, arrays…) decodes as psycopg would decode a query result;
unknown types (enums, domains of unknown base) stay ``str``. Given the staging dialect,
:class:`ValueDecoder` hands non-key values of some types over in the form staging stores instead
(the text path, see there).

Reference: PostgreSQL docs, "Logical Streaming Replication Protocol" / "Message Formats".
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg import adapt, pq

from replicator.changes import TableSchema
from replicator.staging.values import COMPILED_TWINS, text_adapter, text_adapter_kind

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_UNIX_TO_PG_US = 946_684_800_000_000

_Q = struct.Struct("!Q")
_qqq = struct.Struct("!QQQ")
_I = struct.Struct("!I")
_H = struct.Struct("!H")
_QQ = struct.Struct("!QQ")
_QqI = struct.Struct("!QqI")
_QQq = struct.Struct("!QQq")
_Ii = struct.Struct("!Ii")

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


class ProtocolError(ValueError):
    """A replication frame or pgoutput message that is truncated or malformed.

    Both decoders (pure Python and compiled) raise it, with the same message, for the same input:
    the message names the offset in the frame where decoding stopped. Being a ``ValueError``,
    callers that caught the older ``ValueError`` keep catching it.
    """


def _truncated(pos: int, need: int, size: int) -> ProtocolError:
    return ProtocolError(f"truncated message: {need} bytes needed at offset {pos}, {size} in all")


def _py_parse_copy_message(buf: memoryview | bytes) -> XLogData | Keepalive:
    size = len(buf)
    if size == 0:
        raise ProtocolError("empty replication message")
    kind = buf[0]
    if kind == 0x77:  # 'w'
        if size < 25:
            raise _truncated(1, 24, size)
        start, end, sent = _qqq.unpack_from(buf, 1)
        return XLogData(start, end, sent, memoryview(buf)[25:])
    if kind == 0x6B:  # 'k'
        if size < 18:
            raise _truncated(1, 17, size)
        end, sent = _QQ.unpack_from(buf, 1)
        return Keepalive(end, sent, bool(buf[17]))
    raise ProtocolError(f"unexpected replication message type {chr(kind)!r}")


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


def _py_cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(0, pos)
    if end < 0:
        raise ProtocolError(f"unterminated string at offset {pos}")
    try:
        return buf[pos:end].decode("utf-8"), end + 1
    except UnicodeDecodeError:
        raise ProtocolError(f"invalid UTF-8 in the string at offset {pos}") from None


def _py_tuple(buf: bytes, pos: int) -> tuple[list[Any], int]:
    """TupleData at ``pos``: (raw values, offset after it)."""
    size = len(buf)
    if pos + 2 > size:
        raise _truncated(pos, 2, size)
    (n,) = _H.unpack_from(buf, pos)
    pos += 2
    out: list[Any] = []
    append = out.append
    for _ in range(n):
        if pos >= size:
            raise _truncated(pos, 1, size)
        kind = buf[pos]
        pos += 1
        # 't' text; 'b' binary (protocol 2+ with the binary option, not requested): same layout.
        if kind == 0x74 or kind == 0x62:
            if pos + 4 > size:
                raise _truncated(pos, 4, size)
            (ln,) = _I.unpack_from(buf, pos)
            pos += 4
            end = pos + ln
            if end > size:
                raise _truncated(pos, ln, size)
            append(buf[pos:end])
            pos = end
        elif kind == 0x6E:  # 'n' null
            append(None)
        elif kind == 0x75:  # 'u' unchanged toast
            append(UNCHANGED)
        else:
            raise ProtocolError(f"unknown tuple data kind {chr(kind)!r} at offset {pos - 1}")
    return out, pos


def _py_decode_message(data: memoryview | bytes) -> Message:
    """Decode one pgoutput message (the payload of an XLogData frame)."""
    buf = bytes(data)
    size = len(buf)
    if size == 0:
        raise ProtocolError("empty pgoutput message")
    kind = buf[0]
    if kind == 0x49:  # 'I'
        if size < 5:
            raise _truncated(1, 4, size)
        (rel,) = _I.unpack_from(buf, 1)
        new, _ = _py_tuple(buf, 6)  # 5 is 'N'
        return RowChange("I", rel, new, None, False)
    if kind == 0x55:  # 'U'
        if size < 6:
            raise _truncated(1, 5, size)
        (rel,) = _I.unpack_from(buf, 1)
        pos = 5
        old = None
        old_is_key = False
        marker = buf[pos]
        if marker in (0x4B, 0x4F):  # 'K' | 'O'
            old_is_key = marker == 0x4B
            old, pos = _py_tuple(buf, pos + 1)
            if pos >= size:
                raise _truncated(pos, 1, size)
            marker = buf[pos]
        if marker != 0x4E:
            raise ProtocolError(f"update message without new tuple (offset {pos})")
        new, _ = _py_tuple(buf, pos + 1)
        return RowChange("U", rel, new, old, old_is_key)
    if kind == 0x44:  # 'D'
        if size < 6:
            raise _truncated(1, 5, size)
        (rel,) = _I.unpack_from(buf, 1)
        old_is_key = buf[5] == 0x4B
        old, _ = _py_tuple(buf, 6)
        return RowChange("D", rel, None, old, old_is_key)
    if kind == 0x42:  # 'B'
        if size < 21:
            raise _truncated(1, 20, size)
        final_lsn, ts, xid = _QqI.unpack_from(buf, 1)
        return Begin(final_lsn, ts, xid)
    if kind == 0x43:  # 'C'
        if size < 26:
            raise _truncated(1, 25, size)
        flags = buf[1]
        commit_lsn, end_lsn, ts = _QQq.unpack_from(buf, 2)
        return Commit(flags, commit_lsn, end_lsn, ts)
    if kind == 0x52:  # 'R'
        if size < 5:
            raise _truncated(1, 4, size)
        (oid,) = _I.unpack_from(buf, 1)
        ns, pos = _py_cstring(buf, 5)
        name, pos = _py_cstring(buf, pos)
        if pos + 3 > size:
            raise _truncated(pos, 3, size)
        ident = chr(buf[pos])
        (ncols,) = _H.unpack_from(buf, pos + 1)
        pos += 3
        cols = []
        for _ in range(ncols):
            if pos >= size:
                raise _truncated(pos, 1, size)
            flags = buf[pos]
            cname, pos = _py_cstring(buf, pos + 1)
            if pos + 8 > size:
                raise _truncated(pos, 8, size)
            toid, tmod = _Ii.unpack_from(buf, pos)
            pos += 8
            cols.append(RelationColumn(cname, toid, tmod, bool(flags & 1)))
        return Relation(oid, ns or "public", name, ident, cols)
    if kind == 0x54:  # 'T'
        if size < 6:
            raise _truncated(1, 5, size)
        (n,) = _I.unpack_from(buf, 1)
        opts = buf[5]
        if 6 + 4 * n > size:
            raise _truncated(6, 4 * n, size)
        oids = [_I.unpack_from(buf, 6 + 4 * i)[0] for i in range(n)]
        return Truncate(oids, bool(opts & 1), bool(opts & 2))
    if kind == 0x59:  # 'Y'
        if size < 5:
            raise _truncated(1, 4, size)
        (oid,) = _I.unpack_from(buf, 1)
        ns, pos = _py_cstring(buf, 5)
        name, _ = _py_cstring(buf, pos)
        return TypeMsg(oid, ns, name)
    if kind == 0x4D:  # 'M'
        if size < 10:
            raise _truncated(1, 9, size)
        flags = buf[1]
        (lsn,) = _Q.unpack_from(buf, 2)
        prefix, pos = _py_cstring(buf, 10)
        if pos + 4 > size:
            raise _truncated(pos, 4, size)
        (ln,) = _I.unpack_from(buf, pos)
        pos += 4
        if pos + ln > size:
            raise _truncated(pos, ln, size)
        return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos : pos + ln])
    if kind == 0x4F:  # 'O'
        if size < 9:
            raise _truncated(1, 8, size)
        (lsn,) = _Q.unpack_from(buf, 1)
        name, _ = _py_cstring(buf, 9)
        return Origin(lsn, name)
    raise ProtocolError(f"unknown pgoutput message type {chr(kind)!r}")


OBJECT_VALUES_ENV = "SYNC_DAEMON_OBJECT_VALUES"
"""Set to 1 to decode every value with psycopg's loaders (the path before text values): for the
equivalence tests and the benchmark."""


class ValueDecoder:
    """Turns raw text column values into the values capture hands to staging.

    Without a staging dialect (or with ``text_values=False``, or ``SYNC_DAEMON_OBJECT_VALUES=1``)
    every value goes through psycopg's text loaders: Python objects, as a query result would
    give them. With one, the non-key columns of the types listed in
    :func:`replicator.staging.values.text_adapter` take the *text path*: the source's text goes
    straight to the form staging stores (a decimal or a timestamp is not built only to be
    written back as text), the same form the loader and the staging converter would give.

    Key columns always keep the loader's Python values: the apply path coalesces changes by key
    tuple, and the snapshot copy and incremental-snapshot chunks produce keys in that form. So
    does a column whose type in the mirror is not the type the stream sends (a type change being
    followed), since the converter is chosen by the mirror's type. ``schema_of`` gives the
    mirror's shape for a Relation; it is asked when a Relation's first row arrives, and a
    table's key or column types change only with a new Relation message.
    """

    def __init__(
        self,
        context: Any = None,
        *,
        dialect: str | None = None,
        schema_of: Callable[[Relation], TableSchema | None] | None = None,
        text_values: bool | None = None,
    ) -> None:
        self._tx = adapt.Transformer(context)
        self._loaders: dict[int, Any] = {}
        self._plans: dict[int, tuple[Relation, tuple[tuple[str, Any, int], ...]]] = {}
        if text_values is None:
            text_values = os.environ.get(OBJECT_VALUES_ENV, "") in ("", "0")
        self.dialect = dialect
        self._schema_of = schema_of
        self.text_values = bool(text_values and dialect and schema_of)

    @property
    def value_path(self) -> str:
        """``"text"`` or ``"objects"``: which path values take (printed by the benchmark)."""
        return "text" if self.text_values else "objects"

    def loader(self, oid: int) -> Any:
        ld = self._loaders.get(oid)
        if ld is None:
            ld = self._loaders[oid] = self._tx.get_loader(oid, pq.Format.TEXT).load
        return ld

    def _plan(self, rel: Relation) -> tuple[tuple[str, Any, int], ...]:
        """(column name, function of the raw text, its compiled fast kind) for each column of
        ``rel`` (the kind: see :data:`replicator.staging.values.FAST_KINDS`)."""
        schema = self._schema_of(rel) if self.text_values and self._schema_of else None
        plan = []
        for c in rel.columns:
            fn = load = self.loader(c.type_oid)
            kind = 0
            if schema is not None and self.dialect is not None and c.name not in schema.key:
                mirror = schema.column(c.name)
                adapter = None
                if mirror is not None and mirror.type_oid == c.type_oid:
                    adapter = text_adapter(c.type_oid, self.dialect, load)
                if adapter is not None:
                    fn, kind = adapter, text_adapter_kind(c.type_oid, self.dialect)
            plan.append((c.name, fn, kind))
        return tuple(plan)

    def _plan_of(self, rel: Relation) -> tuple[tuple[str, Any, int], ...]:
        plan = self._plans.get(id(rel))
        if plan is None or plan[0] is not rel:
            plan = (rel, self._plan(rel))
            self._plans[id(rel)] = plan
        return plan[1]

    def row(self, rel: Relation, raw: list[Any]) -> dict[str, Any]:
        """Column name -> value, leaving out unchanged TOAST columns."""
        return _row(self._plan_of(rel), raw)

    def row_builder(self, rel: Relation) -> Callable[[list[Any]], dict[str, Any]]:
        """``row(rel, ·)`` as one callable with the plan bound (no Python call of its own per
        row): for a caller that keeps it as long as ``rel`` is the table's Relation."""
        return functools.partial(_row, self._plan_of(rel))


def _py_row(plan: tuple[tuple[str, Any, int], ...], raw: list[Any]) -> dict[str, Any]:
    """Column name -> ``function(raw value)`` for each (name, function, kind) of ``plan`` and
    value of ``raw``: None stays None, UNCHANGED (a TOAST column not sent) is left out. The
    inner loop of every streamed row; ``_pgoutput.row`` is its compiled twin, which runs the
    fast branch of the text adapters of a kind other than 0 in C (the same values)."""
    out: dict[str, Any] = {}
    for (name, load, _kind), v in zip(plan, raw, strict=False):
        if v is None:
            out[name] = None
        elif v is not UNCHANGED:
            out[name] = load(v)
    return out


# ---------------------------------------------------------------------------- decoder choice
# The pure-Python decoder above is the reference; ``_pgoutput`` (replicator/cdc/_pgoutput.c) is
# its compiled twin, built by ``pip install`` when a C compiler is there (optional: the install
# succeeds without). Both give the same values and raise the same ProtocolError for the same
# input (tests/test_pgoutput_compiled.py). SYNC_DAEMON_PURE_DECODER=1 forces the pure one.
pure_parse_copy_message = _py_parse_copy_message
pure_decode_message = _py_decode_message
pure_tuple = _py_tuple
pure_cstring = _py_cstring
pure_row = _py_row

compiled: Any = None
if COMPILED_TWINS:
    try:
        from replicator.cdc import _pgoutput as compiled  # type: ignore[attr-defined,no-redef]
    except ImportError:
        compiled = None
    else:
        compiled.configure(
            ProtocolError,
            UNCHANGED,
            XLogData,
            Keepalive,
            Begin,
            Commit,
            Relation,
            RelationColumn,
            TypeMsg,
            RowChange,
            Truncate,
            LogicalMessage,
            Origin,
        )

DECODER: str
"""Which decoder runs: ``"compiled"`` or ``"pure"`` (printed by ``status`` and the benchmarks)."""
if compiled is not None:
    DECODER = "compiled"
    parse_copy_message: Callable[[memoryview | bytes], XLogData | Keepalive] = (
        compiled.parse_copy_message
    )
    decode_message: Callable[[memoryview | bytes], Message] = compiled.decode_message
    _tuple: Callable[[bytes, int], tuple[list[Any], int]] = compiled.tuple_data
    _cstring: Callable[[bytes, int], tuple[str, int]] = compiled.cstring
else:
    DECODER = "pure"
    parse_copy_message = _py_parse_copy_message
    decode_message = _py_decode_message
    _tuple = _py_tuple
    _cstring = _py_cstring

# A compiled module built before ``row`` took (name, function, kind) triples (an install not
# rebuilt) still decodes; the rows are then built by the pure loop.
_row: Callable[[tuple[tuple[str, Any, int], ...], list[Any]], dict[str, Any]] = (
    compiled.row if getattr(compiled, "ROW_PLAN", 0) == 3 else _py_row
)
