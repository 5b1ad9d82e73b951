"""Text values: the source's text straight to the stored form equals the old path, byte for byte.

The old path turns pgoutput's text into a Python object with psycopg's loader and the staging
converter turns that into what is stored; the text path (``replicator.staging.values.
text_adapter``) goes from the text to the stored form. A real PostgreSQL renders generated values
of every supported type to text with the type's output function — what pgoutput sends — under
session time zones with odd offsets, and:

- per value, both paths store the same thing on SQLite (type and bytes, read back with
  ``typeof``/``quote``) and on PostgreSQL (the text of the stored value, by INSERT and by COPY),
  or both refuse the value with the same error;
- end to end, rows decoded by :class:`ValueDecoder` on both paths and applied through
  :class:`ApplyTxn` (executemany and, on PostgreSQL, COPY) leave identical mirrors;
- key columns keep the loader's Python values on the text path; the switch forces the old path.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import adapt, pq

from replicator.cdc.pgoutput import (
    OBJECT_VALUES_ENV,
    UNCHANGED,
    Relation,
    RelationColumn,
    ValueDecoder,
)
from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.staging import StagingStore
from replicator.staging.apply import _COPY_THRESHOLD
from replicator.staging.values import pg_param, sqlite_converter, sqlite_type, text_adapter
from tests.conftest import PgServer

ZONES = [
    "UTC",
    "Asia/Kolkata",  # +05:30
    "America/St_Johns",  # -03:30 / -02:30
    "Europe/Paris",  # +00:09:21 before 1911
    "Pacific/Kiritimati",  # +14
    "Europe/London",  # +00 and +01
    "America/Caracas",
]

# (format_type name, type oid (0: looked up), strategy of input literals)
_SPECIAL_NUMERIC = [
    "NaN",
    "Infinity",
    "-Infinity",
    "0",
    "0.000000",
    "0.0000000",
    "0.0000001",
    "-0.0000010",
    "0.00000000000000000001",
    "1e-20",
    "10.0000001",
    "1e20",
    "123456789012345678901234567890.123456789",
    "-5.50",
]
_SPECIAL_DATE = [
    "infinity",
    "-infinity",
    "0044-03-15 BC",
    "0001-01-01",
    "9999-12-31",
    "10000-01-01",
]
_SPECIAL_TIME = ["24:00:00", "23:59:59.999999", "00:00:00.1", "12:00:00.000010", "00:00:00"]
_SPECIAL_TS = [
    "infinity",
    "-infinity",
    "2000-01-01 00:00:00 BC",
    "0099-06-01 12:00:00.5",
    "10000-01-01 00:00:00",
    "9999-12-31 23:59:59.999999",
    "1900-01-01 00:00:00",
    "2000-02-29 12:30:00.000001",
]
_SPECIAL_TSTZ = [
    *_SPECIAL_TS,
    "2024-03-31 02:30:00+00",
    "2024-01-01 00:00:00.123+05:30",
    "1890-01-01 00:00:00+00:09:21",
    "0001-01-01 00:00:00+00",
    "9999-12-31 23:59:59+00",
    "9999-12-31 23:00:00-02",
]

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
json_texts = st.one_of(
    json_values.map(json.dumps),
    json_values.map(lambda v: json.dumps(v, indent=2, ensure_ascii=False)),
    st.sampled_from(['{"a": 1.10, "b": 1e2}', "null", '"x"', "[1,  2]", '{"b":1,"a":2,"a":3}']),
)


def _timestamps(tz: bool) -> st.SearchStrategy[str]:
    offsets = st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30))])
    when = st.datetimes(
        min_value=dt.datetime(1, 1, 2),
        max_value=dt.datetime(9999, 12, 30),
        timezones=offsets if tz else st.none(),
    )
    return when.map(lambda d: d.isoformat(sep=" ")) | st.sampled_from(
        _SPECIAL_TSTZ if tz else _SPECIAL_TS
    )


TYPES: list[tuple[str, st.SearchStrategy[str]]] = [
    ("smallint", st.integers(-(2**15), 2**15 - 1).map(str)),
    ("integer", st.integers(-(2**31), 2**31 - 1).map(str)),
    ("bigint", st.integers(-(2**63), 2**63 - 1).map(str)),
    (
        "numeric",
        st.decimals(allow_nan=False, allow_infinity=False).map(str)
        | st.sampled_from(_SPECIAL_NUMERIC),
    ),
    (
        "numeric(12,4)",
        st.decimals(-(10**7), 10**7, allow_nan=False, allow_infinity=False, places=6).map(str)
        | st.sampled_from(["NaN", "0.00001", "-0.00005"]),
    ),
    ("double precision", st.floats().map(repr)),
    ("text", texts),
    ("character varying(20)", texts.map(lambda s: s[:20])),
    ("boolean", st.sampled_from(["t", "f"])),
    ("bytea", st.binary(max_size=40).map(lambda b: "\\x" + b.hex())),
    ("json", json_texts),
    ("jsonb", json_texts),
    (
        "integer[]",
        st.lists(st.integers(-(2**31), 2**31 - 1) | st.none(), max_size=5).map(
            lambda xs: "{" + ",".join("NULL" if x is None else str(x) for x in xs) + "}"
        ),
    ),
    ("text[]", st.sampled_from(["{}", '{a,"b c",NULL,"\\"q\\""}', "{é,北京}"])),
    ("uuid", st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())),
    (
        "date",
        st.dates(min_value=dt.date(1, 1, 1)).map(dt.date.isoformat)
        | st.sampled_from(_SPECIAL_DATE),
    ),
    ("time without time zone", st.times().map(dt.time.isoformat) | st.sampled_from(_SPECIAL_TIME)),
    (
        "time with time zone",
        st.times().map(lambda t: t.isoformat() + "+02")
        | st.sampled_from(["10:00:00+00", "10:00:00.5-03:30", "24:00:00+01"]),
    ),
    ("timestamp without time zone", _timestamps(False)),
    ("timestamp with time zone", _timestamps(True)),
    ("interval", st.sampled_from(["1 day", "-1 mon 2 days 03:04:05.5", "00:00:00.000001"])),
    ("mood", st.sampled_from(["sad", "ok", "happy 😀"])),
]


@pytest.fixture(scope="module")
def render_db(pg_server: PgServer) -> Iterator[str]:
    """A database with the enum type; its DSN."""
    name = pg_server.createdb("values")
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy 😀')")
    try:
        yield dsn
    finally:
        pg_server.dropdb(name)


@pytest.fixture(scope="module")
def pg(render_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(render_db, autocommit=True) as conn:
        yield conn


def _render(
    conn: psycopg.Connection[Any], type_name: str, literal: str, zone: str
) -> tuple[int, bytes | None]:
    """(type oid, the type's output text of ``literal``) under session time zone ``zone``; the
    text is None when the server refuses the literal."""
    conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    cur = conn.cursor()
    try:
        cur.execute(f"SELECT %s::text::{type_name}", (literal,))
    except psycopg.DataError:
        return 0, None
    res = cur.pgresult
    assert res is not None
    return res.ftype(0), res.get_value(0, 0)


def _outcome(fn: Callable[[bytes], Any], text: bytes) -> tuple[bool, Any]:
    try:
        return True, fn(text)
    except Exception as exc:  # both paths must refuse the same texts the same way
        return False, type(exc)


def _sqlite_stored(col: Column, value: Any) -> Any:
    """What SQLite stores (type and text), or the error storing it raised."""
    conv = sqlite_converter(col)
    v = value if conv is None or value is None else conv(value)
    db = sqlite3.connect(":memory:")
    try:
        db.execute(f"CREATE TABLE t (v {sqlite_type(col)})")
        db.execute("INSERT INTO t VALUES (?)", (v,))
        return db.execute("SELECT typeof(v), quote(v) FROM t").fetchone()
    except Exception as exc:  # a JSON scalar past 64 bits, say: both paths must fail alike
        return type(exc)
    finally:
        db.close()


def _pg_stored(conn: psycopg.Connection[Any], col: Column, value: Any) -> Any:
    """The stored value's text (UTC session) after INSERT with a parameter (twice: once
    prepared) and after COPY, or the error storing it raised."""
    conn.execute("SET TimeZone = 'UTC'")
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(f"CREATE TEMP TABLE s (n int, v {col.type_name}) ON COMMIT DROP")
            for i in range(2):
                conn.execute(
                    "INSERT INTO s VALUES (%s, %s)", (i, pg_param(col, value)), prepare=i == 1
                )
            with conn.cursor().copy("COPY s (n, v) FROM STDIN") as copy:
                copy.write_row((2, pg_param(col, value)))
            cur = conn.cursor()
            cur.execute("SELECT n, v FROM s ORDER BY n")
            res = cur.pgresult
            assert res is not None
            return [(res.get_value(r, 0), res.get_value(r, 1)) for r in range(res.ntuples)]
    except psycopg.Error as exc:
        return type(exc)


def _assert_same(pg: psycopg.Connection[Any], type_name: str, literal: str, zone: str) -> None:
    oid, text = _render(pg, type_name, literal, zone)
    if text is None:
        return
    load = adapt.Transformer().get_loader(oid, pq.Format.TEXT).load
    col = Column("v", type_name, oid)
    old_ok, old = _outcome(load, text)
    for dialect in ("sqlite", "postgresql"):
        adapter = text_adapter(oid, dialect, load) or load
        new_ok, new = _outcome(adapter, text)
        assert (new_ok, new if not new_ok else True) == (old_ok, old if not old_ok else True), (
            dialect,
            text,
        )
        if not old_ok:
            continue
        if dialect == "sqlite":
            assert _sqlite_stored(col, new) == _sqlite_stored(col, old), (text, old, new)
        else:
            assert _pg_stored(pg, col, new) == _pg_stored(pg, col, old), (text, old, new)


@pytest.mark.parametrize("type_name,literals", TYPES, ids=[t for t, _ in TYPES])
def test_text_path_stores_what_the_loader_path_stores(
    pg: psycopg.Connection[Any], type_name: str, literals: st.SearchStrategy[str]
) -> None:
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(literal=literals, zone=st.sampled_from(ZONES))
    def check(literal: str, zone: str) -> None:
        _assert_same(pg, type_name, literal, zone)

    check()


@pytest.mark.parametrize(
    "type_name,literal",
    [("numeric", v) for v in _SPECIAL_NUMERIC]
    + [("date", v) for v in _SPECIAL_DATE]
    + [("time without time zone", v) for v in _SPECIAL_TIME]
    + [("timestamp without time zone", v) for v in _SPECIAL_TS]
    + [("timestamp with time zone", v) for v in _SPECIAL_TSTZ],
)
@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "Europe/Paris"])
def test_special_values_every_zone(
    pg: psycopg.Connection[Any], type_name: str, literal: str, zone: str
) -> None:
    """The edge values each time, not only when hypothesis draws them."""
    _assert_same(pg, type_name, literal, zone)


# ---------------------------------------------------------------------------- ValueDecoder
_REL_COLS = [
    RelationColumn("id", 1700, -1, True),
    RelationColumn("price", 1700, -1, False),
    RelationColumn("at", 1184, -1, False),
    RelationColumn("n", 23, -1, False),
]
_SCHEMA = TableSchema(
    "public",
    "t",
    (
        Column("id", "numeric", 1700),
        Column("price", "numeric", 1700),
        Column("at", "timestamp with time zone", 1184),
        Column("n", "integer", 23),
    ),
    ("id",),
)
_RAW = [b"1.50", b"2.50", b"2024-01-01 10:00:00.5+00", b"7"]


def _decoder(**kw: Any) -> ValueDecoder:
    return ValueDecoder(dialect="sqlite", schema_of=lambda rel: _SCHEMA, **kw)


def test_decoder_keys_keep_python_values_others_take_the_text_path() -> None:
    rel = Relation(1, "public", "t", "d", _REL_COLS)
    dec = _decoder()
    assert dec.value_path == "text"
    assert dec.row(rel, _RAW) == {
        "id": Decimal("1.50"),
        "price": "2.50",
        "at": "2024-01-01 10:00:00.500000+00:00",
        "n": 7,
    }


def test_decoder_old_path_by_flag_env_and_without_dialect(monkeypatch: pytest.MonkeyPatch) -> None:
    rel = Relation(1, "public", "t", "d", _REL_COLS)
    objects = {
        "id": Decimal("1.50"),
        "price": Decimal("2.50"),
        "at": dt.datetime(2024, 1, 1, 10, 0, 0, 500000, dt.UTC),
        "n": 7,
    }
    assert _decoder(text_values=False).row(rel, _RAW) == objects
    assert ValueDecoder().row(rel, _RAW) == objects
    assert ValueDecoder().value_path == "objects"
    monkeypatch.setenv(OBJECT_VALUES_ENV, "1")
    assert _decoder().value_path == "objects"
    assert _decoder().row(rel, _RAW) == objects


def test_decoder_mirror_of_another_type_keeps_the_loader() -> None:
    """While a type change is followed the mirror's converter is the old type's: loader."""
    rel = Relation(1, "public", "t", "d", _REL_COLS)
    retyped = TableSchema(
        "public",
        "t",
        (_SCHEMA.columns[0], Column("price", "text", 25), *_SCHEMA.columns[2:]),
        ("id",),
    )
    dec = ValueDecoder(dialect="sqlite", schema_of=lambda rel: retyped)
    assert dec.row(rel, _RAW)["price"] == Decimal("2.50")
    unknown = ValueDecoder(dialect="sqlite", schema_of=lambda rel: None)
    assert unknown.row(rel, _RAW)["price"] == Decimal("2.50")


# ---------------------------------------------------------------------------- end to end
E2E_COLUMNS = [
    ("k", "text"),
    ("id", "integer"),
    ("price", "numeric"),
    ("qty", "numeric(12,3)"),
    ("name", "text"),
    ("flag", "boolean"),
    ("blob", "bytea"),
    ("doc", "jsonb"),
    ("doc2", "json"),
    ("tags", "text[]"),
    ("ref", "uuid"),
    ("day", "date"),
    ("tod", "time without time zone"),
    ("ttz", "time with time zone"),
    ("at", "timestamp without time zone"),
    ("atz", "timestamp with time zone"),
    ("span", "interval"),
    ("ratio", "double precision"),
    ("mood", "mood"),
]


def _source_rows(dsn: str, n: int, seed: int) -> tuple[list[RelationColumn], list[list[Any]]]:
    """``n`` rows of every type rendered by PostgreSQL (session zone Asia/Kolkata for some,
    UTC for most, as a walsender would); raw texts as pgoutput carries them."""
    rnd = random.Random(seed)
    table = f"src_{seed}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        cols = ", ".join(f"{c} {t}" for c, t in E2E_COLUMNS)
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} ({cols}, PRIMARY KEY (k, id))")
        rows = []
        for i in range(n):
            micro = rnd.choice([0, 5, 120000, 999999])
            rows.append(
                (
                    f"k{i % 3}",
                    i,
                    rnd.choice([Decimal("1.50"), Decimal("0.00000001"), Decimal("NaN"), None])
                    if i % 5 == 0
                    else Decimal(rnd.randrange(10**9)) / 100,
                    Decimal(rnd.randrange(10**6)) / 1000,
                    rnd.choice(["", "Zoë 北京 🚀", "a'b\\c", f"n{i}"]),
                    rnd.choice([True, False, None]),
                    rnd.randbytes(rnd.randrange(5)),
                    psycopg.types.json.Jsonb({"a": i, "f": 1.10, "s": "é"}),
                    psycopg.types.json.Json([i, {"x": None}]),
                    ["x", None, f"t{i}"],
                    uuid.UUID(int=rnd.getrandbits(128)),
                    dt.date(rnd.randrange(1, 9999), 1, 1) + dt.timedelta(days=rnd.randrange(300)),
                    dt.time(rnd.randrange(24), 0, 0, micro),
                    dt.time(1, 2, 3, micro, dt.timezone(dt.timedelta(hours=-3, minutes=-30))),
                    dt.datetime(2000, 1, 1, 0, 0, 0, micro) + dt.timedelta(hours=i * 7),
                    dt.datetime(2024, 3, 31, 0, 30, 0, micro, dt.UTC) + dt.timedelta(hours=i),
                    dt.timedelta(days=i, microseconds=micro),
                    rnd.random() * 10 ** rnd.randrange(-5, 20),
                    rnd.choice(["sad", "ok", "happy 😀"]),
                )
            )
        ph = ", ".join(["%s"] * len(E2E_COLUMNS))
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES ({ph})", rows)
            raw: list[list[Any]] = []
            for zone_of in range(2):
                cur.execute(
                    "SELECT set_config('TimeZone', %s, false)",
                    ("UTC" if zone_of == 0 else "Asia/Kolkata",),
                )
                cur.execute(f"SELECT * FROM {table} WHERE id %% 2 = %s ORDER BY id", (zone_of,))
                res = cur.pgresult
                assert res is not None
                types = [res.ftype(c) for c in range(res.nfields)]
                raw += [
                    [res.get_value(r, c) for c in range(res.nfields)] for r in range(res.ntuples)
                ]
    rel_cols = [
        RelationColumn(c, oid, -1, c in ("k", "id"))
        for (c, _), oid in zip(E2E_COLUMNS, types, strict=True)
    ]
    return rel_cols, raw


def _mirror_dump(store: StagingStore, name: str) -> list[Any]:
    cols = ", ".join(c for c, _ in E2E_COLUMNS)
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            sel = ", ".join(f"typeof({c}) || ':' || quote({c})" for c, _ in E2E_COLUMNS)
            return conn.exec_driver_sql(f"SELECT {sel} FROM {name} ORDER BY k, id").fetchall()
        conn.exec_driver_sql("SET TimeZone = 'UTC'")
        return conn.exec_driver_sql(f"SELECT ({cols})::text FROM {name} ORDER BY k, id").fetchall()


@pytest.mark.parametrize("rows", [40, _COPY_THRESHOLD + 100], ids=["executemany", "copy"])
def test_staging_rows_identical_via_both_paths(staging_url: str, render_db: str, rows: int) -> None:
    """The same raw rows decoded on the text path and on the old path, inserted then updated
    (full and partial images, some keys deleted) through ApplyTxn: the mirrors are identical.
    The small case flushes every few changes inside the second transaction (on SQLite into the
    spill tables the logical source uses), the large one takes PostgreSQL's COPY path."""
    if staging_url.startswith("postgresql"):
        with psycopg.connect(staging_url, autocommit=True) as conn:
            conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy 😀')")
    rel_cols, first = _source_rows(render_db, rows, seed=1)
    _, second = _source_rows(render_db, rows, seed=2)
    store = StagingStore(staging_url)
    store.setup()
    dumps = []
    for path, text_values in (("text", True), ("objects", False)):
        schema = TableSchema(
            "public",
            f"t_{path}",
            tuple(
                Column(c, t, rc.type_oid) for (c, t), rc in zip(E2E_COLUMNS, rel_cols, strict=True)
            ),
            ("k", "id"),
        )
        store.ensure_mirror(schema)
        rel = Relation(100, "public", schema.name, "d", rel_cols)
        dec = ValueDecoder(
            dialect=store.dialect, schema_of=lambda r, s=schema: s, text_values=text_values
        )
        assert dec.value_path == path
        decoded = dec.row(rel, first[0])
        assert (type(decoded["atz"]) is str) == text_values, decoded  # the path really ran
        txn = store.begin("src")
        for raw in first:
            txn.apply(Change(schema.qualified, "I", dec.row(rel, raw), None, "1"))
        txn.commit(Checkpoint("src", "1"))
        txn = store.begin("src", spill=True)
        for i, raw in enumerate(second):
            if rows < _COPY_THRESHOLD and i % 8 == 7:
                txn.flush()
            if i % 7 == 3:
                txn.apply(Change(schema.qualified, "D", None, dec.row(rel, raw), "2"))
                continue
            if i % 3 == 1:  # a partial image: an unchanged TOAST value left out
                raw = [
                    UNCHANGED if c == "name" else v
                    for (c, _), v in zip(E2E_COLUMNS, raw, strict=True)
                ]
            txn.apply(Change(schema.qualified, "U", dec.row(rel, raw), None, "2"))
        txn.commit(Checkpoint("src", "2"))
        dumps.append(_mirror_dump(store, store.catalog[schema.qualified].name))
    assert len(dumps[0]) == rows - len(range(3, rows, 7))
    assert dumps[0] == dumps[1]
    store.dispose()
