"""``sync_changes_applied`` is counted per batch: runs of one (table, op) are counted as one
integer and the metric is increased once per commit, with the same totals as counting each
change (whether changes come one by one or in runs, and across several flushes)."""

from __future__ import annotations

import collections
import random
from pathlib import Path

from replicator.changes import Change, Checkpoint, Column, TableSchema
from replicator.metrics import REGISTRY
from replicator.staging import StagingStore

A = TableSchema("public", "a", (Column("id", "integer", 23), Column("v", "text", 25)), ("id",))
B = TableSchema("public", "b", (Column("id", "integer", 23), Column("v", "text", 25)), ("id",))


def _applied(source: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for fam in REGISTRY.collect():
        if fam.name != "sync_changes_applied":
            continue
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels["source"] == source:
                out[(s.labels["table"], s.labels["op"])] = s.value
    return out


def _changes(n: int, seed: int) -> list[Change]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        table = rnd.choice(["public.a", "public.b"])
        op = rnd.choice("IIUUD")
        k = rnd.randrange(50)
        if op == "D":
            out.append(Change(table, "D", None, {"id": k}, str(i)))
        else:
            out.append(Change(table, op, {"id": k, "v": f"v{i}"}, None, str(i)))
        if rnd.random() < 0.3:  # runs of the same (table, op)
            out += [Change(table, op, dict(out[-1].values or {}), out[-1].key, str(i))] * 3
    return out


def test_metric_totals_equal_per_change_counts(tmp_path: Path) -> None:
    store = StagingStore(f"sqlite:///{tmp_path / 's.db'}")
    store.setup()
    store.ensure_mirror(A)
    store.ensure_mirror(B)
    changes = _changes(400, seed=3)
    expected = collections.Counter((c.table, c.op) for c in changes)

    txn = store.begin("metrics-one")
    for i, ch in enumerate(changes):
        txn.apply(ch)
        if i % 97 == 0:
            txn.flush()
    txn.commit(Checkpoint("metrics-one", "1"))
    assert _applied("metrics-one") == {k: float(v) for k, v in expected.items()}

    txn = store.begin("metrics-runs")
    txn.apply_many(changes[:150])
    txn.apply_many(changes[150:])
    txn.commit(Checkpoint("metrics-runs", "1"))
    assert _applied("metrics-runs") == {k: float(v) for k, v in expected.items()}

    txn = store.begin("metrics-rolled-back")
    txn.apply_many(changes)
    txn.rollback()
    assert _applied("metrics-rolled-back") == {}
    store.dispose()
