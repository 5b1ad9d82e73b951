"""A loopback TCP proxy for fault tests: put it between the daemon and PostgreSQL, then cut, slow
and restore the link (the idea of psycopg's ``tests/fix_proxy.py``, with threads).

* ``cut()``: close every proxied connection at once (both sides see the socket close) and refuse
  new ones (accepted, then closed at once) until ``restore()``;
* ``slow(delay_s)``: every chunk is forwarded ``delay_s`` seconds late, in both directions;
  ``slow(0)`` is full speed again;
* ``blackhole()``: keep the sockets open but forward nothing (a partition without RST): data
  waits in the proxy and flows again on ``restore()``.

The proxy only ever listens on 127.0.0.1 and connects to a loopback upstream.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Self


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``; fault switches for tests."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        if upstream_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy only forwards to loopback")
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._refusing = False
        self._blackhole = threading.Event()
        self._delay = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self.accepted = 0
        self.refused = 0
        self.cuts = 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._drop_all()
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def dsn_for(self, url: str) -> str:
        """``url`` (postgresql://user@127.0.0.1:PORT/db) rewritten to go through the proxy."""
        host, port = self.upstream
        return url.replace(f"@{host}:{port}/", f"@127.0.0.1:{self.port}/")

    # ------------------------------------------------------------------ fault switches
    def cut(self) -> None:
        """Close all connections and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._refusing = True
            self.cuts += 1
        self._drop_all()

    def restore(self) -> None:
        """Accept and forward again, at full speed."""
        with self._lock:
            self._refusing = False
            self._delay = 0.0
        self._blackhole.clear()

    def slow(self, delay_s: float) -> None:
        """Forward every chunk ``delay_s`` seconds late (0: full speed)."""
        with self._lock:
            self._delay = max(0.0, delay_s)

    def blackhole(self) -> None:
        """Forward nothing, close nothing (until :meth:`restore`)."""
        self._blackhole.set()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._conns)

    # ------------------------------------------------------------------ internals
    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for a, b in conns:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                self.refused += 1
                with contextlib.suppress(OSError):
                    # linger 0: the client sees a reset, as from a firewall that rejects
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._conns.append((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    delay = self._delay
                if delay:
                    time.sleep(delay)
                # A blackholed link holds the data until restore (bounded by the test's timeout).
                while self._blackhole.is_set() and not self._stop.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns = [c for c in self._conns if src not in c]
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
