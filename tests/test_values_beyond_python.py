"""Dates and times Python cannot hold reach staging as they are in the ERP; capture goes on.

``infinity``, ``-infinity``, BC dates, years past 9999 and ``24:00:00`` are valid PostgreSQL
values without a ``datetime`` equivalent. One such row used to stop the initial copy (or the
stream) with psycopg's DataError, and the daemon retried the same row forever.
"""

from __future__ import annotations

import threading

import psycopg
import sqlalchemy as sa

from replicator.cdc.logical import LogicalSource
from replicator.config import parse_config
from replicator.staging import StagingStore
from tests.helpers import wait_until

COLUMNS = "id, valid_until, born, closes, far"
ROWS = [
    (1, "infinity", "2020-05-01", "24:00:00", "12000-01-01 00:00:00"),
    (2, "-infinity", "0044-03-15 BC", "08:30:00", "2024-02-29 23:59:59.5"),
    (3, "2026-01-01 10:00:00+00", "infinity", "00:00:00", "infinity"),
]


def _source_texts(url: str) -> list[tuple[str, ...]]:
    with psycopg.connect(url) as c:
        return [
            tuple(r)
            for r in c.execute(
                "SELECT id::text, valid_until::text, born::text, closes::text, far::text "
                "FROM periods ORDER BY id"
            )
        ]


def _staging_texts(store: StagingStore) -> list[tuple[str, ...]]:
    """The mirror's values as text, in PostgreSQL's own text form on PostgreSQL staging."""
    cast = "::text" if store.dialect == "postgresql" else ""
    cols = ", ".join(f"{c.strip()}{cast}" for c in COLUMNS.split(","))
    info = store.mirror("public.periods")
    assert info is not None
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {cols} FROM {store.q(info.name)} ORDER BY id")).all()
    return [tuple(str(v) for v in r) for r in rows]


def test_infinity_bc_and_24_00_are_copied_and_streamed(erp_db: str, staging_url: str) -> None:
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        c.execute(
            "CREATE TABLE periods (id int PRIMARY KEY, valid_until timestamptz, born date, "
            "closes time, far timestamp)"
        )
        c.execute(f"INSERT INTO periods ({COLUMNS}) VALUES (%s, %s, %s, %s, %s)", ROWS[0])
    cfg = parse_config(
        {
            "erp": {"dsn": erp_db},
            "capture": {"mode": "logical", "tables": ["public.periods"]},
            "staging": {"url": staging_url},
        }
    )
    store = StagingStore(staging_url)
    src = LogicalSource(cfg, store)
    src.start()  # the initial copy meets row 1
    with psycopg.connect(erp_db, autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        for row in ROWS[1:]:
            c.execute(f"INSERT INTO periods ({COLUMNS}) VALUES (%s, %s, %s, %s, %s)", row)
        c.execute("UPDATE periods SET born = '-infinity', far = '-infinity' WHERE id = 1")
    stop = threading.Event()
    try:
        wait_until(
            lambda: src.run_cycle(0.2, stop) >= 0 and len(store.rows("public.periods")) == 3,
            60,
            0,
            "streamed rows",
        )
        wait_until(
            lambda: (
                src.run_cycle(0.2, stop) >= 0
                and store.rows("public.periods")[0][2] is not None
                and "infinity" in str(store.rows("public.periods")[0][2])
            ),
            60,
            0,
            "the update",
        )
    finally:
        src.close()
    staged = _staging_texts(store)
    source = _source_texts(erp_db)
    assert [r[0] for r in staged] == ["1", "2", "3"]
    # Values beyond Python are stored in PostgreSQL's text, exactly; on SQLite staging the
    # ordinary ones keep their usual stored form (ISO text), on PostgreSQL staging their value.
    for got, want in zip(staged, source, strict=True):
        for g, w in zip(got, want, strict=True):
            if "infinity" in w or "BC" in w or w.startswith(("24:", "12000")):
                assert g == w, (got, want)
    if store.dialect == "postgresql":
        assert staged == source
    store.dispose()
