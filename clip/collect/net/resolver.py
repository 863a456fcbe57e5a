"""A caching, single-flight DNS resolver shared by all fetcher threads.

Web-scale URL lists repeat hosts heavily (a CDN host can serve millions of images); resolving per request
puts the system resolver on the critical path and hammers it. `Resolver` resolves each host once per TTL,
and when N threads ask for the same new host at once, one of them does the lookup and the others wait for
its answer (single flight). Failures are cached too, for a shorter time, so a dead host costs one lookup.

With `timeout_s`, every real lookup runs on a small pool of daemon threads and its callers wait at most
`timeout_s` for it: getaddrinfo has no timeout of ours and the OS resolver can block for tens of seconds per
attempt. A lookup that overruns is abandoned (its thread finishes on its own), the callers get a temporary
`ResolveError`, and nothing is cached for it, so the next request for that host waits on the same lookup
again (never a second thread for one host); if that lookup does answer late, its answer is cached.

    resolver = Resolver(ttl_s=300, timeout_s=10)
    addresses, waited_ms = resolver.resolve("example.com", 443)
    resolver.close()
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

# (host, port) -> IP address strings, in the order to try them.
Lookup = Callable[[str, int], list[str]]

_NEGATIVE_TTL_CAP_S = 60.0  # a failed lookup is retried at most this long after it failed
_PRUNE_EVERY = 4096  # resolutions between sweeps of expired entries
_LOOKUP_THREADS = 32  # most lookups in flight at once (stuck ones included); more wait for a free thread
_IDLE_EXIT_S = 10.0  # a lookup thread with nothing to do for this long exits


class ResolveError(OSError):
    """The host has no address (NXDOMAIN, no A/AAAA record, resolver failure).

    `temporary` is true when the resolver said "try again" (EAI_AGAIN: a timeout or SERVFAIL upstream), so a
    later run may succeed; NXDOMAIN and "no address" are not temporary.
    """

    def __init__(self, message: str, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


class _TimedOut(ResolveError):
    """The lookup overran the resolver's deadline (always temporary)."""


def system_lookup(host: str, port: int) -> list[str]:
    """The operating system's resolver (getaddrinfo), IPv4 addresses first, duplicates removed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        temporary = exc.errno == socket.EAI_AGAIN
        raise ResolveError(f"cannot resolve {host!r}: {exc}", temporary=temporary) from exc
    except UnicodeError as exc:
        raise ResolveError(f"cannot resolve {host!r}: {exc}") from exc
    seen: dict[str, int] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        # IPv4 first: dual-stack hosts whose AAAA record points nowhere are common on the web.
        seen.setdefault(str(sockaddr[0]), 0 if family == socket.AF_INET else 1)
    return sorted(seen, key=lambda a: seen[a])


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _DaemonPool:
    """A bounded pool of daemon threads that start on demand and exit when idle or closed.

    Not concurrent.futures.ThreadPoolExecutor: its threads are joined at interpreter exit, so one
    getaddrinfo stuck in the OS resolver would hang the end of a run; daemon threads are simply left behind.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError(f"lookup pool max_workers must be >= 1, got {max_workers}")
        self._max_workers = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # One token per idle worker that no submitted job has claimed yet (the scheme of ThreadPoolExecutor).
        self._idle = threading.Semaphore(0)
        self._workers = 0
        self._closed = False

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("lookup pool is closed")
            self._queue.put((future, fn, args))
            if not self._idle.acquire(blocking=False) and self._workers < self._max_workers:
                self._workers += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._workers}", daemon=True).start()
        return future

    def close(self) -> None:
        """Idle workers exit now, busy ones once their job is done; later submits raise. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in range(self._workers):
                self._queue.put(None)  # each worker takes at most one

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=_IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._idle.acquire(blocking=False):  # no job claimed this worker: retire it
                        self._workers -= 1
                        return
                continue  # a job was submitted meanwhile and counted on this worker
            if item is None:
                with self._lock:
                    self._workers -= 1
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():  # False: its caller gave up before it started
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the caller, like concurrent.futures does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args  # do not keep the last job's answer alive while idle
            self._idle.release()


@dataclass
class _Entry:
    addresses: list[str] | None = None
    error: ResolveError | None = None
    expires: float = 0.0
    timed_out: bool = False  # its lookup overran the deadline: not cached, a late answer may replace it
    done: threading.Event = field(default_factory=threading.Event)


class Resolver:
    """Host -> addresses with a TTL cache and single-flight lookups bounded in time; thread-safe."""

    def __init__(
        self,
        ttl_s: float = 300.0,
        lookup: Lookup | None = None,
        on_lookup: Callable[[float], None] | None = None,
        timeout_s: float | None = None,
        max_lookup_threads: int = _LOOKUP_THREADS,
    ) -> None:
        """`lookup` replaces the system resolver (tests map fake names); `on_lookup(ms)` hears each real lookup.

        `timeout_s` bounds each real lookup (run on up to `max_lookup_threads` daemon threads); None runs it
        on the calling thread, unbounded. Call `close()` when done so idle lookup threads exit at once.
        """
        if ttl_s <= 0:
            raise ValueError(f"Resolver ttl_s must be positive, got {ttl_s}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"Resolver timeout_s must be positive or None, got {timeout_s}")
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._lookup = lookup or system_lookup
        self._on_lookup = on_lookup
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], _Entry] = {}
        # The lookup running for a host, kept after its callers timed out so the next caller waits on it
        # rather than starting another thread for the same host.
        self._running: dict[tuple[str, int], Future] = {}
        self._pool = _DaemonPool(max_lookup_threads, "dns") if timeout_s is not None else None
        self._calls = 0

    def resolve(self, host: str, port: int) -> tuple[list[str], float]:
        """(addresses, ms this call spent resolving or waiting for another thread's lookup).

        Raises ResolveError when the host has no address. An IP literal is returned as is, without a lookup.
        """
        if is_ip_literal(host):
            return [host], 0.0
        key = (host.lower().rstrip("."), port)
        start = time.perf_counter()
        with self._lock:
            self._calls += 1
            if self._calls % _PRUNE_EVERY == 0:
                self._prune(time.monotonic())
            entry = self._entries.get(key)
            owner = entry is None or (entry.done.is_set() and entry.expires <= time.monotonic())
            if owner:
                entry = _Entry()
                self._entries[key] = entry
        assert entry is not None
        if owner:
            self._fill(entry, key)
        else:
            entry.done.wait()
        waited_ms = (time.perf_counter() - start) * 1000.0
        if entry.error is not None:
            raise entry.error
        assert entry.addresses is not None
        return list(entry.addresses), waited_ms

    def close(self) -> None:
        """Let idle lookup threads exit now (a stuck one exits when its lookup returns). Idempotent.

        Cached answers still serve afterwards; a cache miss then fails with a temporary ResolveError.
        """
        if self._pool is not None:
            self._pool.close()

    def _fill(self, entry: _Entry, key: tuple[str, int]) -> None:
        started = time.perf_counter()
        try:
            if self._pool is None:
                addresses = self._lookup(*key)
            else:
                addresses = self._bounded_lookup(key)
            self._settle(entry, key, addresses)
        except _TimedOut as exc:
            entry.error = exc
            entry.timed_out = True
            entry.expires = time.monotonic()  # not cached: the next request for this host asks again
        except ResolveError as exc:
            self._settle(entry, key, exc)
        except Exception as exc:  # a resolver bug or an odd OSError: still wake the waiters, and say why
            entry.error = ResolveError(f"cannot resolve {key[0]!r}: {type(exc).__name__}: {exc}", temporary=True)
            entry.expires = time.monotonic() + min(self.ttl_s, _NEGATIVE_TTL_CAP_S)
        finally:
            entry.done.set()
            if self._on_lookup is not None:
                self._on_lookup((time.perf_counter() - started) * 1000.0)

    def _settle(self, entry: _Entry, key: tuple[str, int], outcome: list[str] | ResolveError) -> None:
        """Fill `entry` (not yet done) with a lookup's answer: addresses for the TTL, a failure for less."""
        if isinstance(outcome, ResolveError):
            entry.error = outcome
            entry.expires = time.monotonic() + min(self.ttl_s, _NEGATIVE_TTL_CAP_S)
        elif not outcome:
            entry.error = ResolveError(f"{key[0]!r} resolved to no address")
            entry.expires = time.monotonic() + min(self.ttl_s, _NEGATIVE_TTL_CAP_S)
        else:
            entry.addresses = list(outcome)
            entry.expires = time.monotonic() + self.ttl_s

    def _bounded_lookup(self, key: tuple[str, int]) -> list[str]:
        """The lookup's answer within `timeout_s`, joining one still running for this host from a caller that
        timed out; raises a temporary ResolveError past the deadline and leaves nothing cached (the entry
        expires at once) so the next request asks again."""
        assert self._pool is not None and self.timeout_s is not None
        with self._lock:
            future = self._running.get(key)
            started_here = future is None
            if future is None:
                future = self._pool.submit(self._lookup, *key)
                self._running[key] = future
        if started_here:
            # Outside the lock: a lookup that already finished runs the callback right here, and it locks.
            future.add_done_callback(lambda done, key=key: self._lookup_finished(key, done))
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            # Still queued (every lookup thread busy): withdraw it so the queue holds only live requests.
            if not future.cancel() and future.done():
                return future.result()  # it answered just now
            raise _TimedOut(
                f"cannot resolve {key[0]!r}: no answer within {self.timeout_s:g} s", temporary=True
            ) from None

    def _lookup_finished(self, key: tuple[str, int], future: Future) -> None:
        """On the lookup thread (or at cancel): forget the running lookup; cache a late answer."""
        with self._lock:
            if self._running.get(key) is future:
                del self._running[key]
            if future.cancelled():
                return
            exc = future.exception()
            if exc is not None and not isinstance(exc, ResolveError):
                return  # a resolver bug: leave the next request to ask again
            entry = self._entries.get(key)
            if entry is not None and not (entry.done.is_set() and entry.timed_out):
                return  # its caller got the answer in time (or a newer lookup owns the host): nothing to add
            late = _Entry()
            self._settle(late, key, exc if isinstance(exc, ResolveError) else future.result())
            late.done.set()
            self._entries[key] = late

    def _prune(self, now: float) -> None:
        """Drop expired entries (lock held) so a crawl over millions of hosts does not grow without bound."""
        stale = [k for k, e in self._entries.items() if e.done.is_set() and e.expires <= now]
        for k in stale:
            del self._entries[k]
