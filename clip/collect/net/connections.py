"""HTTP(S) connections pinned to an address the SSRF guard already checked, and a pool of idle ones.

Guarantees:
- a pinned connection opens its socket to the given IP (through `_open_socket`, the only place the fetcher
  opens sockets) while the Host header, TLS SNI and certificate check use the host name, so a second DNS
  answer cannot redirect it (DNS rebinding);
- `ConnectionPool.take` never returns a connection that sat idle longer than 30 s (servers commonly drop idle
  keep-alive connections after 5-60 s; an older one is closed instead), keeps at most `per_key` idle
  connections per (scheme, host, port) and 512 in all, and closes whatever it cannot keep; it is
  thread-safe and `close_all` closes every idle connection.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections import deque

_IDLE_CONNECTIONS_MAX = 512  # across all hosts; beyond this a finished connection is closed, not pooled
_IDLE_CONNECTION_MAX_AGE_S = 30.0  # servers commonly drop idle keep-alive connections after 5-60 s

# (scheme, host, port): connections are reusable only for the same origin.
PoolKey = tuple[str, str, int]


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """TCP connection to an already checked IP address (the only place the fetcher opens sockets)."""
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to `address` while the Host header names `host`: the checked IP is the one connected to."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.created = time.monotonic()

    def connect(self) -> None:
        self.sock = _open_socket(self.address, self.port, self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to `address` with SNI and certificate check against `host`."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.created = time.monotonic()

    def connect(self) -> None:
        sock = _open_socket(self.address, self.port, self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


PinnedConnection = PinnedHTTPConnection | PinnedHTTPSConnection


def pinned_connection(
    scheme: str, host: str, port: int, address: str, timeout: float, ssl_context: ssl.SSLContext
) -> PinnedConnection:
    """A new, not yet connected, connection to `address` for `host` (`ssl_context` is used for https only)."""
    if scheme == "https":
        return PinnedHTTPSConnection(host, port, address, timeout, ssl_context)
    return PinnedHTTPConnection(host, port, address, timeout)


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port)."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._lock = threading.Lock()
        self._idle: dict[PoolKey, deque[tuple[float, PinnedConnection]]] = {}
        self._count = 0

    def take(self, key: PoolKey) -> PinnedConnection | None:
        now = time.monotonic()
        while True:
            with self._lock:
                idle_queue = self._idle.get(key)
                if not idle_queue:
                    return None
                stamp, conn = idle_queue.pop()
                self._count -= 1
                if not idle_queue:
                    del self._idle[key]
            if now - stamp <= _IDLE_CONNECTION_MAX_AGE_S:
                return conn
            conn.close()

    def put(self, key: PoolKey, conn: PinnedConnection) -> None:
        with self._lock:
            idle_queue = self._idle.setdefault(key, deque())
            if len(idle_queue) < self.per_key and self._count < _IDLE_CONNECTIONS_MAX:
                idle_queue.append((time.monotonic(), conn))
                self._count += 1
                return
        conn.close()

    def close_all(self) -> None:
        with self._lock:
            queues, self._idle, self._count = self._idle, {}, 0
        for idle_queue in queues.values():
            for _stamp, conn in idle_queue:
                conn.close()
