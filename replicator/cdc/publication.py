"""The ERP's publication for logical capture: which tables it sends, with which column lists and
row filters, and bringing it up to date without a moment in which a table is not published.

Owned here so the streaming source only says what it wants (:func:`ensure_publication`); the
publication's SQL is written once.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg import sql

from replicator.config.core import CaptureSection
from replicator.errors import FatalError

log = structlog.get_logger(__name__, service="capture")

Spec = dict[str, Any]
"""What of a table the publication sends: ``{"columns": [...] | None, "filter": str | None}``."""

PLAIN: Spec = {"columns": None, "filter": None}


def table_spec(capture: CaptureSection, table: str) -> Spec:
    """A table's column list and row filter from the config (None: all)."""
    cols = capture.column_list(table)
    return {"columns": list(cols) if cols else None, "filter": capture.row_filter(table)}


def published(table: str, spec: Spec) -> sql.Composable:
    """A table as a publication lists it: ``t (a, b) WHERE (cond)``."""
    out: sql.Composable = sql.Identifier(*table.split(".", 1))
    if spec.get("columns"):
        out = sql.SQL("{} ({})").format(
            out, sql.SQL(", ").join(sql.Identifier(c) for c in spec["columns"])
        )
    if spec.get("filter"):
        # Validated as one plain condition when the config was read (and by PostgreSQL).
        out = sql.SQL("{} WHERE ({})").format(out, sql.SQL(spec["filter"]))
    return out


def changed_specs(wanted: dict[str, Spec], recorded: dict[str, Spec]) -> set[str]:
    """Tables whose column list or row filter differs from what the last run recorded (their
    mirrors must be copied again)."""
    return {t for t, spec in wanted.items() if recorded.get(t, PLAIN) != spec}


def ensure_publication(
    conn: psycopg.Connection[Any], publication: str, wanted: dict[str, Spec], changed: set[str]
) -> None:
    """Create the publication or bring it up to date with ``wanted``; ``changed`` are the tables
    whose spec changed since the last run (see :func:`changed_specs`)."""
    exists = conn.execute(
        "SELECT puballtables FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    pub = sql.Identifier(publication)
    try:
        if exists is None:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    pub, sql.SQL(", ").join(published(t, sp) for t, sp in wanted.items())
                )
            )
            log.info("publication_created", publication=publication, tables=sorted(wanted))
            return
        if exists[0]:
            return
        have = {
            f"{r[0]}.{r[1]}": {"columns": r[2], "filter": r[3]}
            for r in conn.execute(
                "SELECT schemaname, tablename, attnames::text[], rowfilter "
                "FROM pg_publication_tables WHERE pubname = %s",
                (publication,),
            )
        }
        missing = set(wanted) - set(have)
        respec = {t for t in changed if t in have}
        if respec:
            # One statement for the whole list, so no table stops being published meanwhile;
            # tables that are not ours keep what they had.
            tables = [published(t, wanted.get(t) or have[t]) for t in sorted(have)]
            tables += [published(t, wanted[t]) for t in sorted(missing)]
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(pub, sql.SQL(", ").join(tables))
            )
            log.info("publication_tables_changed", publication=publication, tables=sorted(respec))
        elif missing:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                    pub, sql.SQL(", ").join(published(t, wanted[t]) for t in sorted(missing))
                )
            )
            log.info("publication_tables_added", publication=publication, tables=sorted(missing))
    except psycopg.errors.InsufficientPrivilege:
        raise FatalError(
            f"publication {publication!r} is missing or lacks tables and this role may not "
            f"change it. Ask the DBA to run: CREATE PUBLICATION {publication} FOR TABLE "
            f"{', '.join(sorted(wanted))}"
        ) from None
