"""The inbox folder connector: JSON order files dropped into a directory become orders.

For writers (put this in the shop's integration docs): write the order to ``NAME.json.tmp`` (or a
dotfile), then rename it to ``NAME.json`` in the same directory. A rename is atomic, so the daemon
never sees half a file. ``*.tmp`` files and dotfiles are ignored.

For writers that cannot rename, a ``*.json`` file is read only once it is stable:

* with inotify (Linux, via watchdog) a file is ready when it was moved in, or when the last writer
  closed it (``IN_CLOSE_WRITE``) and no one who opened it since still has it open;
* otherwise — files found by the full scan at start or by the periodic rescan that backs up the
  watcher (events can be lost when the kernel queue overflows) — when its size and mtime have not
  changed for ``settle`` seconds.

The order import reads the folder through :meth:`InboxConnector.fetch_orders` and, after the
order-inbox commit that holds a page of orders, calls :meth:`InboxConnector.acknowledge` (files →
``processed/``): a file leaves the inbox only once its order is durably stored. Consumers that
decide per order call :meth:`InboxConnector.poll`, import each item's order, then
:meth:`InboxConnector.mark_done` (file → ``processed/``) or :meth:`InboxConnector.mark_failed`
(file → ``failed/`` with ``NAME.reason.txt`` beside it). Files that are not valid UTF-8 JSON orders
go to ``failed/`` straight away, with the reason, and the next files keep flowing. A file handed out
by ``poll`` is not handed out again until it is marked; after a restart it is read again (the
ledger's e-number check makes that harmless).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from replicator.connectors.base import ShopConnector, ShopOrder

log = structlog.get_logger(__name__)

# Keys tried, in order, for the e-number / modification time of a dropped order.
_E_NUMBER_KEYS = ("e_number", "increment_id", "number", "id")
_UPDATED_KEYS = ("updated_at", "date_modified_gmt", "modified_at")


@dataclass(frozen=True, slots=True)
class InboxItem:
    """One order file handed out by :meth:`InboxConnector.poll`."""

    path: Path
    order: ShopOrder


@dataclass(slots=True)
class _Track:
    """What is known about one candidate file."""

    size: int = -1
    mtime_ns: int = -1
    stable_since: float = 0.0
    opens: int = 0  # open handles seen via inotify (ours included; they close again)
    ready: bool = False  # moved in, or closed after writing with no handle left open
    watched: bool = False  # inotify has reported on it, so open/close tracking is trustworthy


class _Events(FileSystemEventHandler):
    """Forwards watchdog events to the consumer thread; no work in the observer thread."""

    def __init__(self, q: queue.SimpleQueue[FileSystemEvent]) -> None:
        self.q = q

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.q.put(event)


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """Which file this is: a rename or a rewrite under the same name changes it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fspath(p: bytes | str) -> str:
    return os.fsdecode(p)


class InboxConnector(ShopConnector):
    """JSON order files in ``directory``; see the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        directory: Path | str,
        *,
        settle: float = 2.0,
        watch: bool = True,
        rescan_interval: float = 30.0,
        max_bytes: int = 16 * 1024 * 1024,
        batch: int = 100,
    ) -> None:
        self.name = name
        self.directory = Path(directory)
        self.processed_dir = self.directory / "processed"
        self.failed_dir = self.directory / "failed"
        self.settle = settle
        self.rescan_interval = rescan_interval
        self.max_bytes = max_bytes
        # Files read per poll: a backlog of thousands of files must not be held in memory at once.
        self.batch = batch
        self._tracks: dict[str, _Track] = {}
        self._inflight: set[str] = set()
        self._events: queue.SimpleQueue[FileSystemEvent] = queue.SimpleQueue()
        self._observer: BaseObserver | None = None
        self._last_scan = float("-inf")
        self._lock = threading.RLock()  # poll() moves bad files while holding it
        for d in (self.directory, self.processed_dir, self.failed_dir):
            d.mkdir(parents=True, exist_ok=True)
        if watch:
            self.start_watching()

    # -- watching --------------------------------------------------------------------------------
    def start_watching(self) -> None:
        if self._observer is not None:
            return
        observer = Observer()
        observer.schedule(_Events(self._events), str(self.directory), recursive=False)
        try:
            observer.start()
        except OSError as exc:
            # e.g. inotify watch limit reached: the periodic scan still finds files, just later.
            log.warning("inbox watcher unavailable; scanning only", shop=self.name, error=str(exc))
            return
        self._observer = observer

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    @staticmethod
    def wanted(path: Path) -> bool:
        """A file the inbox reads: ``*.json``, not hidden, not a temporary file."""
        n = path.name
        return n.endswith(".json") and not n.startswith(".") and not n.endswith(".tmp")

    def _in_inbox(self, p: str) -> Path | None:
        path = Path(p)
        if path.parent != self.directory or not self.wanted(path):
            return None
        return path

    def _drain_events(self) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(ev, FileMovedEvent):
                self._tracks.pop(_fspath(ev.src_path), None)
                dest = self._in_inbox(_fspath(ev.dest_path))
                if dest is not None:
                    # A rename is atomic: the writer finished before it renamed.
                    t = self._tracks.setdefault(str(dest), _Track())
                    t.ready, t.watched = True, True
                continue
            path = self._in_inbox(_fspath(ev.src_path))
            if path is None:
                continue
            key = str(path)
            if isinstance(ev, FileDeletedEvent):
                self._tracks.pop(key, None)
                continue
            t = self._tracks.setdefault(key, _Track())
            t.watched = True
            if isinstance(ev, FileOpenedEvent):
                t.opens += 1
            elif isinstance(ev, FileClosedEvent):
                t.opens = max(0, t.opens - 1)
                t.ready = t.opens == 0
            elif isinstance(ev, FileClosedNoWriteEvent):
                t.opens = max(0, t.opens - 1)
            elif isinstance(ev, FileCreatedEvent | FileModifiedEvent):
                t.ready = False  # written again: wait for the close

    def _scan(self) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning(
                "inbox not readable", shop=self.name, dir=str(self.directory), error=str(exc)
            )
            return
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and self.wanted(Path(entry.path)):
                self._tracks.setdefault(entry.path, _Track())

    def _is_stable(self, key: str, t: _Track, now: float) -> bool:
        try:
            st = os.stat(key)
        except FileNotFoundError:
            self._tracks.pop(key, None)
            return False
        if (st.st_size, st.st_mtime_ns) != (t.size, t.mtime_ns):
            t.size, t.mtime_ns, t.stable_since = st.st_size, st.st_mtime_ns, now
            return self.settle == 0  # settle = 0: the writers promise to rename files in
        return now - t.stable_since >= self.settle

    # -- the consumer's interface ----------------------------------------------------------------
    def poll(self) -> list[InboxItem]:
        """Orders whose files are complete, oldest file first; bad files are moved to failed/."""
        with self._lock:
            now = time.monotonic()
            self._drain_events()
            if self._observer is None or now - self._last_scan >= self.rescan_interval:
                self._scan()
                self._last_scan = now
            ready: list[tuple[float, str]] = []
            for key, t in list(self._tracks.items()):
                if key in self._inflight:
                    continue
                if t.watched and t.opens > 0:
                    continue  # someone still has it open (for writing, as far as we know)
                if (t.ready and t.opens == 0) or self._is_stable(key, t, now):
                    try:
                        ready.append((os.stat(key).st_mtime, key))
                    except FileNotFoundError:
                        self._tracks.pop(key, None)
            items: list[InboxItem] = []
            for _, key in sorted(ready):
                if len(items) >= self.batch:
                    break
                item = self._read(Path(key))
                if item is not None:
                    self._inflight.add(key)
                    items.append(item)
            return items

    def mark_done(self, item: InboxItem) -> Path:
        """The order is handled: move its file to processed/."""
        return self._move(item.path, self.processed_dir)

    def mark_failed(self, item: InboxItem, reason: str) -> Path:
        """The order cannot be imported: move its file to failed/ with ``NAME.reason.txt``."""
        return self._fail(item.path, reason)

    def _read(self, path: Path) -> InboxItem | None:
        try:
            st = path.stat()
            size = st.st_size
            if size > self.max_bytes:
                self._fail(path, f"file is {size} bytes, more than the {self.max_bytes} allowed")
                return None
            raw = path.read_bytes()
        except FileNotFoundError:
            self._tracks.pop(str(path), None)
            return None
        except OSError as exc:
            log.warning("inbox file not readable", shop=self.name, file=path.name, error=str(exc))
            return None
        try:
            order = self.parse(raw, path)
        except ValueError as exc:
            self._fail(path, str(exc))
            return None
        order.extra["read_as"] = _signature(st)
        return InboxItem(path=path, order=order)

    def parse(self, raw: bytes, path: Path) -> ShopOrder:
        """The order in one file; ValueError with a reason a person can act on."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start}"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"an order must be a JSON object, not a {type(data).__name__}")
        e_number = next((data[k] for k in _E_NUMBER_KEYS if data.get(k) not in (None, "")), None)
        if e_number is None or isinstance(e_number, dict | list | bool):
            raise ValueError(f"no e-number: the order needs one of {', '.join(_E_NUMBER_KEYS)}")
        updated = self._updated_at(data, path)
        return ShopOrder(
            shop=self.name,
            e_number=str(e_number),
            status=str(data.get("status") or "new"),
            updated_at=updated,
            payload=data,
            raw=raw,
            extra={"file": path.name, "path": str(path)},
        )

    @staticmethod
    def _updated_at(data: dict[str, Any], path: Path) -> datetime:
        for k in _UPDATED_KEYS:
            v = data.get(k)
            if isinstance(v, str):
                try:
                    dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
                except ValueError:
                    continue
                # Zone-less times are taken as UTC, as WooCommerce's *_gmt and Magento's are.
                return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)

    # -- moving files ----------------------------------------------------------------------------
    def _target(self, folder: Path, name: str) -> Path:
        target = folder / name
        if target.exists():
            # The same file name was dropped twice: keep both.
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            target = folder / f"{Path(name).stem}.{stamp}.json"
        return target

    def _move(self, path: Path, folder: Path) -> Path:
        with self._lock:
            target = self._target(folder, path.name)
            os.replace(path, target)
            self._inflight.discard(str(path))
            self._tracks.pop(str(path), None)
            return target

    def _fail(self, path: Path, reason: str) -> Path:
        target = self._move(path, self.failed_dir)
        reason_file = target.with_name(target.name + ".reason.txt")
        when = datetime.now(UTC).isoformat(timespec="seconds")
        reason_file.write_text(f"{when} {path.name}: {reason}\n", encoding="utf-8")
        log.warning(
            "inbox order failed",
            shop=self.name,
            file=path.name,
            reason=reason,
            moved_to=str(target),
        )
        return target

    # -- ShopConnector ---------------------------------------------------------------------------
    def fetch_orders(self, since: datetime, until: datetime | None = None) -> Iterator[ShopOrder]:
        """Every complete order file waiting in the inbox, *whatever its time*: a dropped file is a
        delivery, not the answer to a time query, and an old order dropped late must still come in.

        Nothing moves here: a file goes to processed/ only when the consumer acknowledges its
        order (:meth:`acknowledge`), which it does after the order-inbox commit that holds it.
        Files not acknowledged by the time the iteration ends (the consumer stopped early, raised,
        or the process died) stay in the inbox and are offered again by the next call.
        """
        handed: list[str] = []
        try:
            while items := self.poll():
                handed.extend(str(item.path) for item in items)
                for item in items:
                    yield item.order
        finally:
            with self._lock:
                for key in handed:
                    self._inflight.discard(key)

    def acknowledge(self, orders: Sequence[ShopOrder]) -> None:
        """The orders are committed to the order inbox: move their files to processed/.

        Only a file that is still the one read is moved: if the writer replaced it since (same
        name, new content), the new file stays and is read as a new delivery.
        """
        for order in orders:
            key, read_as = order.extra.get("path"), order.extra.get("read_as")
            if key is None or read_as is None:
                continue  # not read from this folder
            with self._lock:
                try:
                    if _signature(os.stat(key)) != read_as:
                        continue
                    self._move(Path(key), self.processed_dir)
                except FileNotFoundError:
                    # Moved already (acknowledged twice) or removed by someone: the order is
                    # stored either way, so nothing is lost.
                    self._inflight.discard(key)
                    self._tracks.pop(key, None)

    def pending_orders(self) -> Iterator[ShopOrder]:
        """The orders of the files waiting in the inbox, read-only (nothing moved or handed out)."""
        for path in sorted(self.directory.iterdir()):
            if not (path.is_file() and self.wanted(path)):
                continue
            try:
                yield self.parse(path.read_bytes(), path)
            except (OSError, ValueError):
                continue

    def fetch_order(self, e_number: str) -> ShopOrder | None:
        """The order ``e_number`` if its file is waiting in the inbox (read-only)."""
        return next((o for o in self.pending_orders() if o.e_number == e_number), None)
