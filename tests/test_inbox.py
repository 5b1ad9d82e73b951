"""The inbox folder connector on a real directory with a real watchdog observer: complete files are
read once, half-written files are not, handled files move to processed/ or failed/ with a reason."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from replicator.connectors.base import ShopOrder
from replicator.connectors.inbox import InboxConnector, InboxItem


def order(number: str, **extra: object) -> bytes:
    return json.dumps(
        {"number": number, "status": "processing", "total": "10.00", **extra}
    ).encode()


def poll_until(
    inbox: InboxConnector, cond: Callable[[list[InboxItem]], bool], timeout: float = 3.0
) -> list[InboxItem]:
    """Poll like the daemon loop does until ``cond`` holds for everything polled so far."""
    got: list[InboxItem] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += inbox.poll()
        if cond(got):
            return got
        time.sleep(0.05)
    return got


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[InboxConnector]:
    # A long settle: anything read within these tests was read because of an inotify event.
    conn = InboxConnector("files", tmp_path / "in", settle=30.0)
    yield conn
    conn.close()


def test_renamed_file_is_picked_up_once(inbox: InboxConnector) -> None:
    tmp = inbox.directory / "o1.json.tmp"
    tmp.write_bytes(order("E-1"))
    tmp.rename(inbox.directory / "o1.json")
    got = poll_until(inbox, lambda g: len(g) >= 1)
    assert [i.order.e_number for i in got] == ["E-1"]
    assert got[0].order.raw == order("E-1") and got[0].order.shop == "files"
    assert inbox.poll() == []  # handed out: not again until marked
    done = inbox.mark_done(got[0])
    assert done == inbox.processed_dir / "o1.json" and done.read_bytes() == order("E-1")
    assert not (inbox.directory / "o1.json").exists()
    assert inbox.poll() == []


def test_half_written_tmp_file_is_not_read_until_renamed(inbox: InboxConnector) -> None:
    body = order("E-2", note="x" * 5000)
    tmp = inbox.directory / "o2.json.tmp"
    with tmp.open("wb") as f:
        f.write(body[:100])
        f.flush()
        time.sleep(0.3)
        assert inbox.poll() == []
        f.write(body[100:])
    assert inbox.poll() == []  # complete, but still .tmp
    tmp.rename(inbox.directory / "o2.json")
    got = poll_until(inbox, lambda g: len(g) >= 1)
    assert [i.order.e_number for i in got] == ["E-2"] and got[0].order.raw == body


def test_json_file_still_open_for_writing_is_not_read_early(tmp_path: Path) -> None:
    # Even with a settle time shorter than the writer's pause, the open handle keeps it unread.
    conn = InboxConnector("files", tmp_path / "in", settle=0.1)
    try:
        body = order("E-3")
        path = conn.directory / "o3.json"
        with path.open("wb") as f:
            f.write(body[:10])
            f.flush()
            assert poll_until(conn, lambda g: len(g) > 0, timeout=0.6) == []
            f.write(body[10:])
        got = poll_until(conn, lambda g: len(g) >= 1)
        assert [i.order.e_number for i in got] == ["E-3"]
        assert list(conn.failed_dir.iterdir()) == []
    finally:
        conn.close()


def test_files_present_at_start_are_read_once_stable(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.json").write_bytes(order("E-A"))
    (d / "b.json").write_bytes(order("E-B"))
    (d / ".hidden.json").write_bytes(order("E-H"))
    (d / "c.json.tmp").write_bytes(order("E-C"))
    (d / "notes.txt").write_text("ignore me")
    conn = InboxConnector("files", d, settle=0.2)
    try:
        first = conn.poll()
        assert first == []  # just seen: not yet known to be stable
        got = poll_until(conn, lambda g: len(g) >= 2)
        assert sorted(i.order.e_number for i in got) == ["E-A", "E-B"]
        time.sleep(0.3)
        assert conn.poll() == []
    finally:
        conn.close()


def test_bad_files_go_to_failed_with_a_reason_and_the_rest_flow(inbox: InboxConnector) -> None:
    bad = {
        "broken.json": b'{"number": "E-9", "status": ',
        "latin1.json": '{"number": "E-8", "name": "Sørensen"}'.encode("latin-1"),
        "list.json": b"[1, 2]",
        "nonumber.json": b'{"status": "processing"}',
    }
    for name, data in bad.items():
        (inbox.directory / f"{name}.tmp").write_bytes(data)
        os.rename(inbox.directory / f"{name}.tmp", inbox.directory / name)
    (inbox.directory / "good.json.tmp").write_bytes(order("E-7"))
    os.rename(inbox.directory / "good.json.tmp", inbox.directory / "good.json")
    got = poll_until(
        inbox, lambda g: len(g) >= 1 and len(list(inbox.failed_dir.glob("*.reason.txt"))) == 4
    )
    assert [i.order.e_number for i in got] == ["E-7"]
    reasons = {p.name: p.read_text() for p in inbox.failed_dir.glob("*.reason.txt")}
    assert "not valid JSON" in reasons["broken.json.reason.txt"]
    assert "not UTF-8" in reasons["latin1.json.reason.txt"]
    assert "JSON object" in reasons["list.json.reason.txt"]
    assert "no e-number" in reasons["nonumber.json.reason.txt"]
    for name, data in bad.items():
        assert (inbox.failed_dir / name).read_bytes() == data  # the raw input is kept


def test_mark_failed_moves_with_reason(inbox: InboxConnector) -> None:
    (inbox.directory / "x.json.tmp").write_bytes(order("E-5"))
    os.rename(inbox.directory / "x.json.tmp", inbox.directory / "x.json")
    [item] = poll_until(inbox, lambda g: len(g) >= 1)
    target = inbox.mark_failed(item, "unknown SKU SKU-404 on line 2")
    assert target == inbox.failed_dir / "x.json"
    assert "unknown SKU SKU-404 on line 2" in (inbox.failed_dir / "x.json.reason.txt").read_text()
    # The same name dropped again later is kept apart, not overwritten.
    (inbox.directory / "x.json.tmp").write_bytes(order("E-5", status="completed"))
    os.rename(inbox.directory / "x.json.tmp", inbox.directory / "x.json")
    [again] = poll_until(inbox, lambda g: len(g) >= 1)
    second = inbox.mark_failed(again, "still unknown")
    assert second != target and second.parent == inbox.failed_dir
    assert (inbox.failed_dir / "x.json").read_bytes() == order("E-5")


def test_fetch_orders_moves_files_only_when_acknowledged(inbox: InboxConnector) -> None:
    # Old timestamps on purpose: a file dropped late is still a new delivery.
    for name, e in (("a", "E-1"), ("b", "E-2"), ("c", "E-3")):
        (inbox.directory / f"{name}.json.tmp").write_bytes(
            order(e, updated_at="2020-01-01T00:00:00Z")
        )
        os.rename(inbox.directory / f"{name}.json.tmp", inbox.directory / f"{name}.json")
    since = datetime(2026, 11, 1, tzinfo=UTC)
    assert inbox.fetch_order("E-2") is not None  # read-only lookup

    # A consumer that reads everything but stores (acknowledges) nothing: nothing moves, however
    # far it iterates, and the next call offers every file again.
    deadline = time.monotonic() + 10
    seen: list[str] = []
    while len(seen) < 3 and time.monotonic() < deadline:
        seen = [o.e_number for o in inbox.fetch_orders(since)]
        time.sleep(0.05)
    assert sorted(seen) == ["E-1", "E-2", "E-3"]
    assert sorted(p.name for p in inbox.directory.glob("*.json")) == ["a.json", "b.json", "c.json"]
    assert list(inbox.processed_dir.iterdir()) == []

    # The consumer stores the first order, acknowledges it, then fails: only that file moves.
    it = inbox.fetch_orders(since)
    assert isinstance(it, Generator)
    first = next(it)
    inbox.acknowledge([first])
    it.close()
    assert [p.name for p in inbox.processed_dir.iterdir()] == [first.extra["file"]]
    offered: dict[str, ShopOrder] = {}
    deadline = time.monotonic() + 10
    while len(offered) < 2 and time.monotonic() < deadline:
        # Our own reads show up as inotify open/close events a moment later, and a file someone
        # has open is not offered: poll like the daemon until both have been offered.
        offered.update((o.e_number, o) for o in inbox.fetch_orders(since))
        time.sleep(0.05)
    rest = list(offered.values())
    assert sorted(o.e_number for o in rest) == sorted({"E-1", "E-2", "E-3"} - {first.e_number})
    inbox.acknowledge(rest)
    inbox.acknowledge(rest)  # a second acknowledgement of the same orders is harmless
    assert list(inbox.directory.glob("*.json")) == []
    assert sorted(p.name for p in inbox.processed_dir.iterdir()) == ["a.json", "b.json", "c.json"]
    assert list(inbox.fetch_orders(since)) == []


def test_backlog_is_read_in_batches_and_oversized_files_fail(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(25):
        (d / f"o{i:02d}.json").write_bytes(order(f"E-{i}"))
    (d / "huge.json").write_bytes(order("E-HUGE", blob="x" * 5000))
    conn = InboxConnector("files", d, settle=0.0, watch=False, batch=10, max_bytes=4096)
    try:
        first = conn.poll()
        assert len(first) == 10
        for item in first:
            conn.mark_done(item)
        rest = list(conn.fetch_orders(datetime.now(UTC)))  # drains the remaining batches
        conn.acknowledge(rest)
        assert sorted(o.e_number for o in rest) == sorted(
            {f"E-{i}" for i in range(25)} - {i.order.e_number for i in first}
        )
        assert len(list(conn.processed_dir.iterdir())) == 25
        assert (
            "more than the 4096 allowed" in (conn.failed_dir / "huge.json.reason.txt").read_text()
        )
    finally:
        conn.close()
