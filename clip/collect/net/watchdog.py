"""A deadline for a whole HTTP exchange, so a slow-drip server cannot hold a worker thread.

Socket timeouts bound each connect and each read, not their sum: a server sending one byte per timeout
would keep a thread forever. `Watchdog.arm(deadline, conn)` guarantees that unless the returned timer is
cancelled first, `timer.expired` turns true soon after `deadline` (time.monotonic()) and the connection's
socket, if open, is shut down (both directions), which wakes the thread blocked on it; that thread then sees
`expired` and reports a timeout rather than whatever error the shutdown produced. A cancelled timer never fires. One daemon
thread serves every timer; it starts on the first `arm` and ends on `stop`.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import socket
import threading
import time


class DeadlineTimer:
    """One armed deadline: `cancel` when the exchange is over; `expired` once the watchdog fired it."""

    __slots__ = ("conn", "expired", "cancelled", "lock")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.expired = False
        self.cancelled = False
        self.lock = threading.Lock()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True

    def fire(self) -> None:
        with self.lock:
            if self.cancelled:
                return
            self.expired = True
            sock = self.conn.sock
        if sock is not None:
            try:  # wakes the thread blocked in recv/send on this socket; it then sees `expired`
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Watchdog:
    """One thread that shuts the sockets of exchanges that outlive their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, DeadlineTimer]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, deadline: float, conn: http.client.HTTPConnection) -> DeadlineTimer:
        timer = DeadlineTimer(conn)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), timer))
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0][2] is timer:  # only an earlier deadline changes how long the watchdog sleeps
                self._cond.notify()
        return timer

    def _run(self) -> None:
        while True:
            due: list[DeadlineTimer] = []
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].cancelled):
                    due.append(heapq.heappop(self._heap)[2])
                if not due:
                    timeout = self._heap[0][0] - now if self._heap else None
                    self._cond.wait(timeout)
                    continue
            for timer in due:
                timer.fire()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
