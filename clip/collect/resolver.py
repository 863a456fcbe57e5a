"""A caching, single-flight DNS resolver shared by all fetcher threads.

Web-scale URL lists repeat hosts heavily (a CDN host can serve millions of images); resolving per request
puts the system resolver on the critical path and hammers it. `Resolver` resolves each host once per TTL,
and when N threads ask for the same new host at once, one of them does the lookup and the others wait for
its answer (single flight). Failures are cached too, for a shorter time, so a dead host costs one lookup.

    resolver = Resolver(ttl_s=300)
    addresses, waited_ms = resolver.resolve("example.com", 443)
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# (host, port) -> IP address strings, in the order to try them.
Lookup = Callable[[str, int], list[str]]

_NEGATIVE_TTL_CAP_S = 60.0  # a failed lookup is retried at most this long after it failed
_PRUNE_EVERY = 4096  # resolutions between sweeps of expired entries


class ResolveError(OSError):
    """The host has no address (NXDOMAIN, no A/AAAA record, resolver failure).

    `temporary` is true when the resolver said "try again" (EAI_AGAIN: a timeout or SERVFAIL upstream), so a
    later run may succeed; NXDOMAIN and "no address" are not temporary.
    """

    def __init__(self, message: str, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


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


@dataclass
class _Entry:
    addresses: list[str] | None = None
    error: ResolveError | None = None
    expires: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class Resolver:
    """Host -> addresses with a TTL cache and single-flight lookups; thread-safe."""

    def __init__(
        self,
        ttl_s: float = 300.0,
        lookup: Lookup | None = None,
        on_lookup: Callable[[float], None] | None = None,
    ) -> None:
        """`lookup` replaces the system resolver (tests map fake names); `on_lookup(ms)` hears each real lookup."""
        if ttl_s <= 0:
            raise ValueError(f"Resolver ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._lookup = lookup or system_lookup
        self._on_lookup = on_lookup
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._lookups = 0
        self._calls = 0

    @property
    def lookups(self) -> int:
        """How many real lookups were made (cache misses)."""
        return self._lookups

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
                self._lookups += 1
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

    def _fill(self, entry: _Entry, key: tuple[str, int]) -> None:
        started = time.perf_counter()
        try:
            addresses = self._lookup(*key)
            if not addresses:
                raise ResolveError(f"{key[0]!r} resolved to no address")
            entry.addresses = list(addresses)
            entry.expires = time.monotonic() + self.ttl_s
        except ResolveError as exc:
            entry.error = exc
            entry.expires = time.monotonic() + min(self.ttl_s, _NEGATIVE_TTL_CAP_S)
        except Exception as exc:  # a resolver bug or an odd OSError: still wake the waiters, and say why
            entry.error = ResolveError(f"cannot resolve {key[0]!r}: {type(exc).__name__}: {exc}", temporary=True)
            entry.expires = time.monotonic() + min(self.ttl_s, _NEGATIVE_TTL_CAP_S)
        finally:
            entry.done.set()
            if self._on_lookup is not None:
                self._on_lookup((time.perf_counter() - started) * 1000.0)

    def _prune(self, now: float) -> None:
        """Drop expired entries (lock held) so a crawl over millions of hosts does not grow without bound."""
        stale = [k for k, e in self._entries.items() if e.done.is_set() and e.expires <= now]
        for k in stale:
            del self._entries[k]
