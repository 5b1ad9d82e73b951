"""A mirror row's driver parameters: the compiled ``params`` gives what its pure twin gives.

Both are fed the same rows of every kind of value with the SQLite staging converters (and none),
and must return equal tuples of the same types, or raise the same error (a missing column, a
converter that fails). The compiled one passes a ``str`` by without calling the converter; that
is only right because every converter returns a str unchanged, which is checked here too.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.changes import Column
from replicator.staging import values as V

compiled = V.params if V.params is not V.py_params else None
NOT_BUILT = (
    "replicator.staging._rows is not built (no C compiler at install time), "
    "or SYNC_DAEMON_PURE_DECODER=1 turned it off"
)

TYPES = [
    ("bigint", 20),
    ("text", 25),
    ("numeric(12,2)", 1700),
    ("timestamp with time zone", 1184),
    ("timestamp without time zone", 1114),
    ("date", 1082),
    ("time without time zone", 1083),
    ("uuid", 2950),
    ("jsonb", 3802),
    ("boolean", 16),
    ("double precision", 701),
    ("bytea", 17),
    ("integer[]", 1007),
    ("interval", 1186),
    ("mood", 70000),  # an enum
]
CONVERTERS = [V.sqlite_converter(Column(f"c{i}", t, oid)) for i, (t, oid) in enumerate(TYPES)]

values_st = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.dates(),
    st.times(),
    st.uuids(),
    st.binary(max_size=6),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.timedeltas(),
)


def outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    try:
        got = fn(*args)
    except Exception as e:
        return ("error", type(e), str(e))
    return ("ok", [(type(v), v) for v in got])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(TYPES))), values_st), max_size=8))
def test_compiled_params_is_its_twin(cells: list[tuple[int, Any]]) -> None:
    if compiled is None:
        pytest.skip(NOT_BUILT)
    cols = tuple(f"c{i}" for i in range(len(cells)))
    convs = tuple(CONVERTERS[t] for t, _ in cells)
    row = {c: v for c, (_, v) in zip(cols, cells, strict=True)}
    assert outcome(compiled, cols, convs, row) == outcome(V.py_params, cols, convs, row)
    plain = (None,) * len(cols)
    assert outcome(compiled, cols, plain, row) == outcome(V.py_params, cols, plain, row)
    if cols:  # a column the row does not have
        short = dict(list(row.items())[1:])
        assert outcome(compiled, cols, convs, short) == outcome(V.py_params, cols, convs, short)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_every_sqlite_converter_keeps_a_str(text: str) -> None:
    """Why a str may skip its converter: each converter gives the very same str back."""
    for conv in [*CONVERTERS, V.sqlite_converter(None)]:
        if conv is not None:
            assert conv(text) is text


def test_a_failing_converter_and_bad_arguments() -> None:
    if compiled is None:
        pytest.skip(NOT_BUILT)

    def boom(v: Any) -> Any:
        raise ValueError(f"cannot store {v!r}")

    row = {"a": decimal.Decimal("1.5"), "b": "x"}
    for fn in (compiled, V.py_params):
        with pytest.raises(ValueError, match="cannot store"):
            fn(("a", "b"), (boom, boom), row)
        assert fn(("b",), (boom,), row) == ("x",)  # a str never reaches the converter
    with pytest.raises(TypeError):
        compiled(("a",), (None, None), row)
    with pytest.raises(TypeError):
        compiled(["a"], (None,), row)
    assert compiled(("a", "b"), (None, None), {"a": uuid.UUID(int=1), "b": None})[1] is None
