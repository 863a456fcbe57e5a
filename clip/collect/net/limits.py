"""Per-host politeness: at most `concurrency` requests in flight and at most `rate` requests per second.

Guarantees: `HostLimiter.acquire(host_key)` returns only once the caller holds one of the host's slots and
has spent one of its rate tokens (a burst is capped at min(rate, concurrency), at least 1); every acquire
must be paired with one `release`. The limiter is thread-safe, and its memory stays bounded by the hosts in
use: state of a host nobody holds whose bucket has refilled is dropped, which changes nothing observable.

A limiter holds its limits within one process. Across processes they hold exactly when every host is fetched by
one process only: `host_owner` names that process for a URL, from a hash of its host key that is the same in
every process and on every run (Python's `hash` of a str is salted per process, so it is not used).
"""

from __future__ import annotations

import hashlib
import threading
import time

from clip.collect.net.urls import parse_url


class _TokenBucket:
    """`rate` tokens per second, at most `capacity` saved up; `take` blocks until one is available."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                wait_s = (1.0 - self.tokens) / self.rate
            time.sleep(wait_s)

    def full_since(self, now: float) -> bool:
        with self.lock:
            return self.tokens + (now - self.stamp) * self.rate >= self.capacity


class HostState:
    """One host's slots and bucket; what `acquire` hands out and `release` takes back."""

    def __init__(self, concurrency: int, rate: float) -> None:
        self.slots = threading.Semaphore(concurrency)
        self.bucket = _TokenBucket(rate, capacity=max(1.0, min(rate, float(concurrency))))
        self.users = 0


class HostLimiter:
    """Per-host (name:port) concurrency slots and request rate; state for idle hosts is dropped."""

    def __init__(self, concurrency: int, rate: float) -> None:
        self.concurrency = concurrency
        self.rate = rate
        self._lock = threading.Lock()
        self._hosts: dict[str, HostState] = {}
        self._acquisitions = 0

    def acquire(self, host_key: str) -> HostState:
        with self._lock:
            self._acquisitions += 1
            if self._acquisitions % 4096 == 0:
                self._prune()
            state = self._hosts.get(host_key)
            if state is None:
                state = self._hosts[host_key] = HostState(self.concurrency, self.rate)
            state.users += 1
        state.slots.acquire()
        try:
            state.bucket.take()
        except BaseException:
            self.release(state)
            raise
        return state

    def release(self, state: HostState) -> None:
        state.slots.release()
        with self._lock:
            state.users -= 1

    def _prune(self) -> None:
        """Forget hosts nobody is using whose bucket has refilled (so forgetting changes nothing)."""
        now = time.monotonic()
        idle = [k for k, s in self._hosts.items() if s.users == 0 and s.bucket.full_since(now)]
        for key in idle:
            del self._hosts[key]


def host_owner(url: str, owners: int) -> int:
    """Which of `owners` processes fetches `url`: a stable hash of the host key (name:port) the limits use.

    A URL that does not parse has no host and goes to owner 0 (it fails as bad_url without any request).
    """
    target = parse_url(url)
    if target is None:
        return 0
    digest = hashlib.blake2b(target.host_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % owners
