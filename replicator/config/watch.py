"""Watch the config file and say when its *content* changed, debounced.

Reading a file makes inotify report "opened" and "closed without writing"; ``cat config.toml``,
``sync-daemon status`` and the daemon's own re-read all do that. Reacting to those events made
the daemon reload about once a second for ever (each reload re-reads the file, which is another
event). So events only arm a timer; when the file has been quiet for ``debounce`` seconds its
SHA-256 is compared with the content last loaded, and only a different hash is a change.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import structlog
from watchdog.events import (
    FileClosedNoWriteEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = structlog.get_logger(__name__, service="daemon")

# Events a read causes; they never change the content, so they never arm the timer.
_READ_EVENTS = (FileOpenedEvent, FileClosedNoWriteEvent)


def file_digest(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of the file's bytes, or None when it cannot be read (mid-rename, removed)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    """Tells the main loop when the config file's content changed.

    The observer thread only records that something happened; :meth:`changed` (called from the
    main loop) does the hashing, so no work and no decision happen in the observer thread.
    """

    def __init__(self, path: str | os.PathLike[str], debounce: float = 0.5) -> None:
        self.path = os.path.realpath(path)
        self.debounce = debounce
        self._digest = file_digest(self.path)
        self._due_at: float | None = None
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None

    def start(self) -> bool:
        """Start watching; False when the platform has no file events (SIGHUP still works)."""
        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if isinstance(event, _READ_EVENTS) or event.is_directory:
                    return
                paths = (event.src_path, getattr(event, "dest_path", "") or "")
                if any(p and os.path.realpath(os.fsdecode(p)) == watcher.path for p in paths):
                    watcher._arm()

        try:
            observer = Observer()
            observer.schedule(_Handler(), os.path.dirname(self.path), recursive=False)
            observer.daemon = True
            observer.start()
        except OSError as exc:
            log.warning("config_watch_unavailable", error=str(exc))
            return False
        self._observer = observer
        return True

    def _arm(self) -> None:
        # Editors write in steps (truncate, write, rename): wait until the file is quiet.
        with self._lock:
            self._due_at = time.monotonic() + self.debounce

    def loaded(self, digest: str | None = None) -> None:
        """Record the content that is in force now (after a reload, also one from SIGHUP)."""
        with self._lock:
            self._digest = digest if digest is not None else file_digest(self.path)

    def changed(self) -> bool:
        """True once per content change, after the file has been quiet for ``debounce`` s."""
        with self._lock:
            if self._due_at is None or time.monotonic() < self._due_at:
                return False
            self._due_at = None
            digest = file_digest(self.path)
            if digest is None or digest == self._digest:
                return False
            self._digest = digest
            return True

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
