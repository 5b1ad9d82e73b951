"""The initial copy of logical capture: the watched tables as they stood when the slot was made.

The slot is created with an exported snapshot (:meth:`ReplicationSlot.create_exported`), the
tables are copied inside that snapshot (COPY, streamed and committed to staging in chunks of
``capture.batch_size`` rows, so memory stays bounded), and the slot's consistent point becomes the
checkpoint the stream starts from: the copy and the stream neither overlap nor leave a gap.

While the copy runs the checkpoint is in state ``snapshot``, so a crash during it is noticed at
the next start and the copy begins again (:meth:`ReplicationSlot.take_over`). Copies made while
the stream goes on (a table added later, ``resync --table``) are :mod:`replicator.cdc.snapshot`'s.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg import sql

from replicator.cdc.slot import ReplicationSlot
from replicator.changes import Change, Checkpoint, TableSchema
from replicator.config.core import CaptureSection
from replicator.db import pg_connect
from replicator.errors import RetryableError
from replicator.staging import StagingStore

log = structlog.get_logger(__name__, service="capture")


def copy_initial(
    slot: ReplicationSlot,
    store: StagingStore,
    source: str,
    schemas: list[TableSchema],
    capture: CaptureSection,
    extra: dict[str, Any],
) -> int:
    """Empty staging of ``source``'s tables, create the slot with an exported snapshot, copy
    ``schemas`` inside it and commit the slot's consistent point as the streaming checkpoint
    (with ``extra``, the checkpoint's incremental-snapshot state). Returns the rows copied."""
    store.reset_source(source, [s.qualified for s in schemas])
    with store.transaction(source) as txn:
        txn.commit(Checkpoint(source, "0/0", state="snapshot"), slot=slot.name, replicated=False)
    rows = 0
    with slot.create_exported() as exported:
        snap = pg_connect(slot.erp.url, "snapshot", connect_timeout=slot.erp.connect_timeout)
        try:
            snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snap.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(exported.name)))
            # The snapshot is imported; the walsender may now be released.
            exported.release()
            for schema in schemas:
                rows += copy_table(snap, store, source, schema, capture)
            snap.execute("COMMIT")
        finally:
            snap.close()
    position = exported.consistent_point
    with store.transaction(source) as txn:
        txn.commit(Checkpoint(source, position, state="streaming", extra=extra), slot=slot.name)
    log.info("snapshot_done", slot=slot.name, rows=rows, position=position)
    return rows


def copy_table(
    snap: psycopg.Connection[Any],
    store: StagingStore,
    source: str,
    schema: TableSchema,
    capture: CaptureSection,
) -> int:
    """COPY one table's rows (its column list and row filter applied) on ``snap`` into its
    mirror, committing every ``capture.batch_size`` rows; the rows copied."""
    cols = [c.name for c in schema.columns]
    query = sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in cols),
        sql.Identifier(schema.schema, schema.name),
        _where(capture.row_filter(schema.qualified)),
    )
    batch = capture.batch_size
    n = 0
    txn = store.begin(source)
    try:
        with snap.cursor() as cur, cur.copy(query) as copy:
            copy.set_types([c.type_oid for c in schema.columns])
            for row in copy.rows():
                txn.apply(
                    Change(
                        schema.qualified,
                        "I",
                        dict(zip(cols, row, strict=True)),
                        position="snapshot",
                    )
                )
                n += 1
                if txn.pending_count >= batch:
                    txn.commit(None)
                    txn = store.begin(source)
        # ALTER TABLE ... TYPE (a rewrite) is not MVCC-safe: committed after the exported
        # snapshot, it leaves the table looking empty to it, and the stream never sends those
        # rows. The checkpoint is still "snapshot", so the next start copies everything again.
        # COPY holds the table's ACCESS SHARE lock: no rewrite can commit after this check.
        rewritten = snap.execute(
            "SELECT c.relfilenode <> pg_relation_filenode(c.oid) FROM pg_class c "
            "WHERE c.oid = %s::regclass",
            (sql.Identifier(schema.schema, schema.name).as_string(snap),),
        ).fetchone()
        if rewritten is not None and rewritten[0]:
            raise RetryableError(
                f"{schema.qualified} was rewritten (ALTER TABLE ... TYPE, TRUNCATE) after the "
                "initial copy's snapshot was taken; the copy starts again"
            )
        txn.commit(None)
    finally:
        txn.close()
    log.info("table_copied", table=schema.qualified, rows=n)
    return n


def _where(condition: str | None) -> sql.Composable:
    """`` WHERE (cond)`` for a table's row filter (validated when the config was read)."""
    return sql.SQL(" WHERE ({})").format(sql.SQL(condition)) if condition else sql.SQL("")
