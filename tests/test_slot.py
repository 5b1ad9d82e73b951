"""The slot handover at start: staging's checkpoint and the slot's row decide whether an initial
copy is due, or why capture must not start.

No server: the slot's row is given as ``pg_replication_slots`` would show it (the same decisions
end to end, with a daemon, are in test_logical.py: a dropped slot, a second daemon).
"""

from __future__ import annotations

from typing import Any

import pytest

from replicator.cdc.slot import ReplicationSlot
from replicator.changes import Checkpoint
from replicator.config import parse_config
from replicator.errors import DaemonAlreadyRunning, FatalError, SlotMissingError


class Slot(ReplicationSlot):
    """A slot whose row is given, and which records a drop instead of running it."""

    def __init__(self, row: dict[str, Any] | None) -> None:
        cfg = parse_config(
            {
                "erp": {"dsn": "postgresql://127.0.0.1/erp"},
                "capture": {"mode": "logical", "tables": ["public.items"]},
            }
        )
        super().__init__(cfg.erp, "sync_slot")
        self._row = row
        self.dropped = False

    def row(self, conn: Any) -> dict[str, Any] | None:
        return self._row

    def drop(self, conn: Any) -> None:
        self.dropped = True


def slot_row(active_pid: int | None = None, wal_status: str = "reserved") -> dict[str, Any]:
    return {"slot_name": "sync_slot", "active_pid": active_pid, "wal_status": wal_status}


STREAMING = Checkpoint("erp", "0/16B3748")


def test_no_checkpoint_and_no_slot_takes_the_initial_copy() -> None:
    slot = Slot(None)
    assert slot.take_over(None, None) is True
    assert not slot.dropped


def test_a_copy_that_did_not_finish_drops_its_slot_and_starts_again() -> None:
    slot = Slot(slot_row())
    assert slot.take_over(None, Checkpoint("erp", "0/0", state="snapshot")) is True
    assert slot.dropped


def test_a_streaming_checkpoint_with_its_slot_streams_on() -> None:
    slot = Slot(slot_row())
    assert slot.take_over(None, STREAMING) is False
    assert not slot.dropped


@pytest.mark.parametrize(
    ("row", "checkpoint", "error", "says"),
    [
        (slot_row(), None, FatalError, "no checkpoint"),
        (None, STREAMING, SlotMissingError, "is gone"),
        (slot_row(active_pid=4242), STREAMING, DaemonAlreadyRunning, "in use by pid 4242"),
        (slot_row(wal_status="lost"), STREAMING, SlotMissingError, "invalidated"),
    ],
)
def test_what_must_not_stream_says_why(
    row: dict[str, Any] | None, checkpoint: Checkpoint | None, error: type[Exception], says: str
) -> None:
    slot = Slot(row)
    with pytest.raises(error, match=says):
        slot.take_over(None, checkpoint)
    assert not slot.dropped
