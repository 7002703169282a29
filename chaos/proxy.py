"""A TCP proxy on 127.0.0.1 that can reset every connection through it.

Clients are pointed at the proxy instead of the server; ``cut(seconds)``
sends a TCP RST on every live connection (SO_LINGER 0, then close) and
resets new ones for that long, as a broken network path or a load balancer
dropping its table would. Threads, not asyncio: a few dozen connections at
most, and the proxy must keep working while the test's own loop is busy.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

__all__ = ["ResetProxy"]

HOST = "127.0.0.1"


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class ResetProxy:
    def __init__(
        self, target_port: int, target_host: str = HOST, *, unix_path: Path | None = None
    ) -> None:
        self.target = (target_host, target_port)
        if unix_path is not None:
            # A Unix socket crosses network namespaces (it is a file): the way
            # a worker in a namespace of its own reaches this host's loopback.
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(unix_path))
            self.port = 0
        else:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((HOST, 0))
            self.port = int(self._listener.getsockname()[1])
        self._listener.listen(256)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._stop = threading.Event()
        self.resets = 0
        self._thread = threading.Thread(target=self._accept, name="reset-proxy", daemon=True)

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://{HOST}:{self.port}{path}"

    def start(self) -> ResetProxy:
        self._thread.start()
        return self

    def cut(self, seconds: float) -> int:
        """Reset every live connection and refuse service for ``seconds``."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        self.resets += len(pairs)
        return len(pairs)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._down_until:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                self._pairs = [p for p in self._pairs if src not in p]

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(5)
        self.cut(0)
