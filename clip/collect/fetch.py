"""Polite, bounded, SSRF-safe concurrent image fetcher for the collect stage.

One `Fetcher` per process; it is thread-safe and owns a thread pool, keep-alive connection pools, a shared
caching resolver, and per-host limits. Each URL ends in a `FetchResult` with status ok / failed / filtered and
a reason; nothing raises for a bad URL or a misbehaving server.

    with Fetcher(cfg.collect.fetch) as fetcher:
        for index, result in fetcher.fetch_many(urls):   # completion order
            if result.status == "ok":
                write(result.image.jpeg)
        print(fetcher.latency_stats())

What it does for every request:
- resolves the host once per `dns_ttl_s` (single flight), each real lookup bounded by `timeout_s` (one that
  overruns fails the URL with a retryable `dns` and is not cached), checks every address with the SSRF guard
  (`clip.collect.netguard`) and connects only to an address that passed: the socket is opened to that IP
  while the Host header and TLS SNI carry the name, so a second DNS answer cannot redirect it (rebinding);
- follows redirects itself (`max_redirects`), checking each hop again (scheme, guard, robots.txt);
- holds a per-host slot (`per_host_concurrency`) and a per-host token (`per_host_rate` req/s);
- bounds connect and each read by `timeout_s` and the whole exchange by a deadline (`total_timeout_s`) that a
  watchdog enforces by shutting the socket, so a slow-drip server cannot hold a worker;
- retries 429 / 5xx / timeouts / connection errors with exponential backoff or the server's Retry-After
  (seconds or HTTP date, capped at `max_retry_after_s`);
- reads X-Robots-Tag (noai, noimageai), the status, Content-Type and Content-Length before any of the body,
  and stops reading past `max_bytes`;
- decodes and validates the image with `clip.collect.images.process_image`.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import itertools
import logging
import queue
import random
import socket
import ssl
import threading
import time
import urllib.robotparser
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from types import TracebackType
from urllib.parse import quote, urljoin, urlsplit

from clip.collect.images import ImageRejected, ProcessedImage, process_image
from clip.collect.netguard import address_verdict
from clip.collect.resolver import Lookup, ResolveError, Resolver, is_ip_literal
from clip.config import FetchConfig

log = logging.getLogger(__name__)

OK, FAILED, FILTERED = "ok", "failed", "filtered"

# Reasons that mean "we chose not to keep it" (policy) rather than "we could not get it".
FILTERED_REASONS = frozenset(
    {
        "opt_out_header",
        "robots_txt",
        "blocked_address",
        "too_large",
        "content_type",
        "too_small",
        "aspect_ratio",
        "decompression_bomb",
    }
)
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
# X-Robots-Tag directives that take a value after a colon; "name: ..." with any other name scopes to a bot.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview", "indexifembedded"}
)
ACCEPTED_CONTENT_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB
ROBOTS_TTL_S = 24 * 3600.0  # RFC 9309: a cached robots.txt should not be used for more than 24 hours
_ROBOTS_CACHE_MAX = 100_000
_IDLE_CONNECTIONS_MAX = 512  # across all hosts; beyond this a finished connection is closed, not pooled
_IDLE_CONNECTION_MAX_AGE_S = 30.0  # servers commonly drop idle keep-alive connections after 5-60 s
_RESERVOIR_SIZE = 65_536  # latency samples kept per figure; counts stay exact
_READ_CHUNK = 64 * 1024
_DRAIN_MAX = 64 * 1024  # read (and keep the connection for) error / redirect bodies up to this size


@dataclass
class FetchResult:
    """One URL's outcome.

    Reasons when failed: http_<status>, timeout, connection, dns, tls, truncated, bad_response, bad_url,
    too_many_redirects, not_an_image (and error_<Exception> for a bug). When filtered (our policy, see
    FILTERED_REASONS): opt_out_header, robots_txt, blocked_address, too_large, content_type, too_small,
    aspect_ratio, decompression_bomb. `retryable` marks failures a later run may fix: timeout, connection,
    429 / 5xx (after this run's retries), and a temporary DNS failure (the resolver said "try again", or the
    lookup overran `timeout_s`); NXDOMAIN / no address is not retryable.
    """

    url: str
    status: str  # "ok" | "failed" | "filtered"
    reason: str | None = None  # None when ok; e.g. "http_404", "timeout", "opt_out_header" (see module doc)
    retryable: bool = False  # timeouts, connection errors, 429 and 5xx once retries were exhausted
    image: ProcessedImage | None = None
    dns_ms: float | None = None  # time this URL spent resolving (cache hits ~0); None if it never got that far
    download_ms: float | None = None  # request sent -> body read, for the final successful exchange


def result_status(reason: str | None) -> str:
    """ok / filtered / failed for a reason string."""
    if reason is None:
        return OK
    return FILTERED if reason in FILTERED_REASONS else FAILED


def opt_out_in_headers(values: list[str], bot_name: str) -> bool:
    """True when an X-Robots-Tag header value opts this crawler out of AI use (noai / noimageai).

    `X-Robots-Tag: noai, noimageai` applies to every bot; `X-Robots-Tag: otherbot: noai` only to `otherbot`.
    """
    bot_name = bot_name.lower()
    for value in values:
        text = value.strip().lower()
        head, sep, rest = text.partition(":")
        head = head.strip()
        if sep and head and " " not in head and "," not in head and head not in _VALUED_DIRECTIVES:
            if head not in (bot_name, "*"):
                continue  # directives for another crawler
            text = rest
        tokens = {token.strip() for token in text.split(",")}
        if tokens & OPT_OUT_DIRECTIVES:
            return True
    return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


# ----------------------------------------------------------------------------------------------------------
# latency figures


class _Reservoir:
    """A uniform sample of at most `size` values plus an exact count (Vitter's algorithm R)."""

    def __init__(self, size: int = _RESERVOIR_SIZE) -> None:
        self.size = size
        self.count = 0
        self.values: list[float] = []
        self._rng = random.Random(0)

    def add(self, value: float) -> None:
        self.count += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.size:
                self.values[slot] = value

    def summary(self) -> dict[str, float | None]:
        if not self.values:
            return {"median": None, "p99": None}
        ordered = sorted(self.values)

        def quantile(q: float) -> float:
            # Nearest-rank on the sample: the smallest value with at least q of the sample at or below it.
            return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]

        return {"median": round(quantile(0.5), 3), "p99": round(quantile(0.99), 3)}


def latency_summary(results: Iterable[FetchResult]) -> dict:
    """Per-shard latency figures from its results, in the shape of `Fetcher.latency_stats()`.

    DNS here is the time each URL spent resolving (cache hits included, ~0 ms), unlike the per-run figure
    which covers real lookups only.
    """
    dns, download = _Reservoir(), _Reservoir()
    count = 0
    for result in results:
        count += 1
        if result.dns_ms is not None:
            dns.add(result.dns_ms)
        if result.download_ms is not None:
            download.add(result.download_ms)
    return {"dns_ms": dns.summary(), "download_ms": download.summary(), "lookups": dns.count, "requests": count}


# ----------------------------------------------------------------------------------------------------------
# per-host limits


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


class _HostState:
    def __init__(self, concurrency: int, rate: float) -> None:
        self.slots = threading.Semaphore(concurrency)
        self.bucket = _TokenBucket(rate, capacity=max(1.0, min(rate, float(concurrency))))
        self.users = 0


class _HostLimiter:
    """Per-host (name:port) concurrency slots and request rate; state for idle hosts is dropped."""

    def __init__(self, concurrency: int, rate: float) -> None:
        self.concurrency = concurrency
        self.rate = rate
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostState] = {}
        self._acquisitions = 0

    def acquire(self, host_key: str) -> _HostState:
        with self._lock:
            self._acquisitions += 1
            if self._acquisitions % 4096 == 0:
                self._prune()
            state = self._hosts.get(host_key)
            if state is None:
                state = self._hosts[host_key] = _HostState(self.concurrency, self.rate)
            state.users += 1
        state.slots.acquire()
        try:
            state.bucket.take()
        except BaseException:
            self.release(state)
            raise
        return state

    def release(self, state: _HostState) -> None:
        state.slots.release()
        with self._lock:
            state.users -= 1

    def _prune(self) -> None:
        """Forget hosts nobody is using whose bucket has refilled (so forgetting changes nothing)."""
        now = time.monotonic()
        idle = [k for k, s in self._hosts.items() if s.users == 0 and s.bucket.full_since(now)]
        for key in idle:
            del self._hosts[key]


# ----------------------------------------------------------------------------------------------------------
# deadline watchdog


class _Timer:
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


class _Watchdog:
    """One thread that shuts the sockets of exchanges that outlive their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, deadline: float, conn: http.client.HTTPConnection) -> _Timer:
        timer = _Timer(conn)
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
            due: list[_Timer] = []
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


# ----------------------------------------------------------------------------------------------------------
# connections pinned to a checked address


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """TCP connection to an already checked IP address (the only place the fetcher opens sockets)."""
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to `address` while the Host header names `host`: the checked IP is the one connected to."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.created = time.monotonic()

    def connect(self) -> None:
        self.sock = _open_socket(self.address, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
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


_Conn = _PinnedHTTPConnection | _PinnedHTTPSConnection


class _ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port)."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int], deque[tuple[float, _Conn]]] = {}
        self._count = 0

    def take(self, key: tuple[str, str, int]) -> _Conn | None:
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

    def put(self, key: tuple[str, str, int], conn: _Conn) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# the fetcher


@dataclass
class _Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str  # path + query, as sent in the request line

    @property
    def host_key(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class _Exchange:
    """The outcome of one HTTP request (one hop, all retries included)."""

    reason: str | None = None  # failure reason; None: got a response we can use (2xx or a redirect)
    retryable: bool = False
    status: int | None = None
    headers: Message | None = None
    body: bytes | None = None
    download_ms: float | None = None


class _RobotsVerdict:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.parser: urllib.robotparser.RobotFileParser | None = None
        self.allow_all = False
        self.disallow_all = False
        self.expires = 0.0


def _parse_url(url: str) -> _Target | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname
    if not is_ip_literal(host):
        try:
            host = host.encode("idna").decode("ascii")  # internationalised names as DNS sees them
        except UnicodeError:
            return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return None  # control characters: garbage or a header-injection attempt
    if not path.isascii() or " " in path:
        # Scraped URLs carry raw spaces and non-ASCII; the request line must be ASCII, as browsers send it.
        path = "".join(c if c.isascii() and c != " " else quote(c, safe="") for c in path)
    return _Target(url, scheme, host, port or (443 if scheme == "https" else 80), path)


class Fetcher:
    """Concurrent, polite, bounded image fetcher; a context manager; thread-safe; one per process.

    Test/operations knobs beyond the config: `lookup` replaces the system resolver (a callable
    (host, port) -> [ip, ...]); `allowed_addresses` are IPs let through the SSRF guard regardless of its
    verdict (e.g. only 127.0.0.1 of all loopback addresses); `ssl_context` replaces the default
    certificate-verifying context (e.g. to trust a private CA).
    """

    def __init__(
        self,
        cfg: FetchConfig,
        *,
        lookup: Lookup | None = None,
        allowed_addresses: Collection[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.cfg = cfg
        self._allowed_addresses = frozenset(allowed_addresses or ())
        self._stats_lock = threading.Lock()
        self._dns_ms = _Reservoir()
        self._download_ms = _Reservoir()
        self._requests = 0
        # getaddrinfo has no timeout of its own: each real lookup gets the same bound as a connect or read.
        self.resolver = Resolver(
            cfg.dns_ttl_s, lookup, on_lookup=self._record_lookup, timeout_s=cfg.timeout_s
        )
        self._limiter = _HostLimiter(cfg.per_host_concurrency, cfg.per_host_rate)
        self._pool = _ConnectionPool(cfg.per_host_concurrency)
        self._watchdog = _Watchdog()
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._robots_lock = threading.Lock()
        self._robots: dict[tuple[str, str, int], _RobotsVerdict] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._closed = False
        product = cfg.user_agent.split("/", 1)[0].split()
        self._bot_name = product[0] if product else "*"  # "clip-pipeline/0.1 (+url)" -> "clip-pipeline"
        self._total_timeout_s = cfg.total_timeout_s or 3.0 * cfg.timeout_s

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads, the lookup threads and the watchdog, close pooled connections. Idempotent.

        A lookup stuck in the OS resolver is not waited for: its daemon thread ends when the lookup returns.
        """
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._watchdog.stop()
        self._pool.close_all()
        self.resolver.close()

    # -- public API --------------------------------------------------------------------------------------

    def fetch_many(self, urls: list[str]) -> Iterator[tuple[int, FetchResult]]:
        """Fetch all `urls` on the thread pool; yields (index into urls, result) in completion order.

        At most 2 x threads URLs are in flight or waiting at once, so memory stays bounded for long lists;
        closing the iterator early cancels what has not started.
        """
        if self._closed:
            raise RuntimeError("Fetcher is closed")
        executor = self._get_executor()
        window = 2 * self.cfg.threads
        todo = iter(enumerate(urls))
        # Completed futures arrive on a queue (O(1) per result); concurrent.futures.wait() would re-register
        # a waiter on every pending future for every result, which costs real CPU at hundreds of URLs/s.
        finished: queue.SimpleQueue[tuple[int, Future[FetchResult]]] = queue.SimpleQueue()
        pending: dict[int, Future[FetchResult]] = {}

        def submit_next() -> None:
            item = next(todo, None)
            if item is None:
                return
            index, url = item
            future = executor.submit(self.fetch, url)
            pending[index] = future
            future.add_done_callback(lambda done, index=index: finished.put((index, done)))

        try:
            for _ in range(window):
                submit_next()
            while pending:
                index, future = finished.get()
                del pending[index]
                submit_next()
                yield index, future.result()
        finally:
            for future in pending.values():
                future.cancel()

    def fetch(self, url: str) -> FetchResult:
        """Fetch, validate and re-encode one image; never raises for network or content problems."""
        try:
            return self._fetch(url)
        except Exception as exc:  # a bug must cost one URL, not the shard
            log.exception("fetch of %s failed unexpectedly", url)
            return FetchResult(url, FAILED, f"error_{type(exc).__name__}")

    def latency_stats(self) -> dict:
        """Median and p99 of DNS lookups (real ones, not cache hits) and downloads, with counts."""
        with self._stats_lock:
            return {
                "dns_ms": self._dns_ms.summary(),
                "download_ms": self._download_ms.summary(),
                "lookups": self._dns_ms.count,
                "requests": self._requests,
            }

    # -- internals ---------------------------------------------------------------------------------------

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="fetch")
            return self._executor

    def _record_lookup(self, ms: float) -> None:
        with self._stats_lock:
            self._dns_ms.add(ms)

    def _address_allowed(self, address: str) -> bool:
        if address in self._allowed_addresses:
            return True
        verdict = address_verdict(
            address, allow_private=self.cfg.allow_private_addresses, allow_loopback=self.cfg.allow_loopback
        )
        return verdict is None

    def _fetch(self, url: str) -> FetchResult:
        dns_total: list[float] = []
        exchange = self._get(url, dns_total, check_robots=self.cfg.respect_robots_txt, for_image=True)
        dns_ms = round(sum(dns_total), 3) if dns_total else None
        if exchange.reason is not None:
            return FetchResult(
                url, result_status(exchange.reason), exchange.reason, exchange.retryable, None, dns_ms,
                exchange.download_ms,
            )
        assert exchange.body is not None
        try:
            image = process_image(exchange.body, self.cfg)
        except ImageRejected as exc:
            return FetchResult(url, result_status(exc.reason), exc.reason, False, None, dns_ms, exchange.download_ms)
        return FetchResult(url, OK, None, False, image, dns_ms, exchange.download_ms)

    def _get(self, url: str, dns_total: list[float], *, check_robots: bool, for_image: bool) -> _Exchange:
        """GET `url` following redirects (each hop guarded, robots-checked and retried)."""
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            target = _parse_url(current)
            if target is None:
                return _Exchange(reason="bad_url")
            try:
                addresses, waited_ms = self.resolver.resolve(target.host, target.port)
            except ResolveError as exc:  # temporary: EAI_AGAIN or no answer within timeout_s
                return _Exchange(reason="dns", retryable=exc.temporary)
            dns_total.append(waited_ms)
            usable = [a for a in addresses if self._address_allowed(a)]
            if not usable:
                return _Exchange(reason="blocked_address")
            # After the guard, so a refused host is reported as such and its robots.txt is never requested.
            if check_robots and not self._robots_allows(target):
                return _Exchange(reason="robots_txt")
            exchange = self._get_with_retries(target, usable, for_image)
            if exchange.reason is None and exchange.status in REDIRECT_STATUSES:
                location = exchange.headers.get("Location") if exchange.headers is not None else None
                if not location:
                    return _Exchange(reason=f"http_{exchange.status}")
                current = urljoin(current, location.strip())
                continue
            return exchange
        return _Exchange(reason="too_many_redirects")

    def _get_with_retries(self, target: _Target, addresses: list[str], for_image: bool) -> _Exchange:
        attempts = (self.cfg.retries if for_image else 0) + 1
        exchange = _Exchange(reason="connection")
        for attempt in range(attempts):
            state = self._limiter.acquire(target.host_key)
            try:
                exchange = self._exchange(target, addresses, for_image)
            finally:
                self._limiter.release(state)
            if not exchange.retryable or attempt == attempts - 1:
                break
            retry_after = None
            if exchange.headers is not None:
                retry_after = parse_retry_after(exchange.headers.get("Retry-After"))
            if retry_after is None:
                # Exponential backoff with jitter so that threads that failed together do not retry together.
                retry_after = self.cfg.backoff_base_s * (2**attempt) * random.uniform(0.75, 1.25)
            time.sleep(min(retry_after, self.cfg.max_retry_after_s))
        return exchange

    def _new_connection(self, target: _Target, address: str) -> _Conn:
        if target.scheme == "https":
            return _PinnedHTTPSConnection(target.host, target.port, address, self.cfg.timeout_s, self._ssl_context)
        return _PinnedHTTPConnection(target.host, target.port, address, self.cfg.timeout_s)

    def _exchange(self, target: _Target, addresses: list[str], for_image: bool) -> _Exchange:
        """One request/response on a pooled or new connection; a stale pooled connection is retried fresh."""
        key = (target.scheme, target.host, target.port)
        pooled = self._pool.take(key)
        if pooled is not None:
            exchange = self._exchange_on(pooled, key, target, for_image, reused=True)
            if exchange is not None:
                return exchange
        last = _Exchange(reason="connection", retryable=True)
        for address in addresses:  # every one of them passed the guard
            conn = self._new_connection(target, address)
            exchange = self._exchange_on(conn, key, target, for_image, reused=False)
            assert exchange is not None
            if exchange.reason not in ("connect_failed", "connect_timeout"):
                return exchange
            last = _Exchange(
                reason="timeout" if exchange.reason == "connect_timeout" else "connection", retryable=True
            )
        return last

    def _exchange_on(
        self, conn: _Conn, key: tuple[str, str, int], target: _Target, for_image: bool, *, reused: bool
    ) -> _Exchange | None:
        """None only when a reused connection turned out dead before any response (caller opens a new one)."""
        with self._stats_lock:
            self._requests += 1
        started = time.perf_counter()
        timer = self._watchdog.arm(time.monotonic() + self._total_timeout_s, conn)
        keep = False
        stage = "connect"
        try:
            if conn.sock is None:
                try:
                    conn.connect()
                except TimeoutError:
                    return _Exchange(reason="timeout" if timer.expired else "connect_timeout", retryable=True)
                except ssl.SSLError:
                    return _Exchange(reason="tls")
                except OSError:
                    if timer.expired:
                        return _Exchange(reason="timeout", retryable=True)
                    return _Exchange(reason="connect_failed", retryable=True)
                if timer.expired:
                    return _Exchange(reason="timeout", retryable=True)
            stage = "request"
            conn.request(
                "GET",
                target.path,
                headers={
                    "User-Agent": self.cfg.user_agent,
                    "Accept": "image/*,*/*;q=0.8" if for_image else "text/plain,*/*;q=0.8",
                    "Accept-Encoding": "identity",
                },
            )
            response = conn.getresponse()
            stage = "body"
            status = response.status
            headers = response.msg
            if status in REDIRECT_STATUSES or not 200 <= status < 300:
                keep = self._drain(response)
                if status in REDIRECT_STATUSES:
                    return _Exchange(status=status, headers=headers)
                return _Exchange(
                    reason=f"http_{status}", retryable=status == 429 or status >= 500, status=status,
                    headers=headers,
                )
            if for_image:
                refusal = self._refuse_by_headers(headers)
                if refusal is not None:
                    return _Exchange(reason=refusal, status=status, headers=headers)
            limit = self.cfg.max_bytes if for_image else ROBOTS_MAX_BYTES
            if response.length is not None and response.length > limit and for_image:
                return _Exchange(reason="too_large", status=status, headers=headers)
            body, complete = self._read_body(response, limit)
            if not complete:
                if for_image:
                    return _Exchange(reason="too_large", status=status, headers=headers)
                # robots.txt past the limit: parse what fits (RFC 9309), the rest is ignored
            elif not response.will_close:
                keep = True
            download_ms = (time.perf_counter() - started) * 1000.0
            if for_image:
                with self._stats_lock:
                    self._download_ms.add(download_ms)
            return _Exchange(status=status, headers=headers, body=body, download_ms=round(download_ms, 3))
        except http.client.IncompleteRead:
            if timer.expired:
                return _Exchange(reason="timeout", retryable=True)
            return _Exchange(reason="truncated")
        except TimeoutError:
            return _Exchange(reason="timeout", retryable=True)
        except ssl.SSLError:
            if timer.expired:
                return _Exchange(reason="timeout", retryable=True)
            return _Exchange(reason="tls")
        except (OSError, http.client.HTTPException) as exc:
            if timer.expired:
                return _Exchange(reason="timeout", retryable=True)
            if reused and stage == "request" and isinstance(
                exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
            ):
                return None  # the server had closed the idle connection; not the URL's fault
            if isinstance(exc, http.client.HTTPException) and not isinstance(
                exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)
            ):
                return _Exchange(reason="bad_response")  # a malformed status line or headers
            return _Exchange(reason="connection", retryable=True)
        finally:
            timer.cancel()
            if keep and not timer.expired and not self._closed:
                self._pool.put(key, conn)
            else:
                conn.close()

    def _refuse_by_headers(self, headers: Message) -> str | None:
        """Reasons to stop before reading the body: AI opt-out, non-image content type."""
        if self.cfg.respect_x_robots_tag:
            values = headers.get_all("X-Robots-Tag") or []
            if values and opt_out_in_headers(values, self._bot_name):
                return "opt_out_header"
        content_type = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type and not content_type.startswith("image/") and content_type not in ACCEPTED_CONTENT_TYPES:
            return "content_type"
        return None

    @staticmethod
    def _drain(response: http.client.HTTPResponse) -> bool:
        """Read a small error/redirect body so the connection can be reused; False: close it instead."""
        if response.will_close or response.length is None or response.length > _DRAIN_MAX:
            return False
        response.read()
        return True

    @staticmethod
    def _read_body(response: http.client.HTTPResponse, limit: int) -> tuple[bytes, bool]:
        """(body, complete); stops reading once more than `limit` bytes arrived (complete=False)."""
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = response.read(_READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                return b"".join(chunks)[:limit], False
        if response.length:  # Content-Length promised more than arrived
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return b"".join(chunks), True

    # -- robots.txt --------------------------------------------------------------------------------------

    def _robots_allows(self, target: _Target) -> bool:
        key = (target.scheme, target.host, target.port)
        with self._robots_lock:
            verdict = self._robots.get(key)
            owner = verdict is None or (verdict.done.is_set() and verdict.expires <= time.monotonic())
            if owner:
                if len(self._robots) >= _ROBOTS_CACHE_MAX:
                    self._robots.pop(next(iter(self._robots)))  # oldest first (insertion order)
                verdict = self._robots[key] = _RobotsVerdict()
        assert verdict is not None
        if owner:
            try:
                self._load_robots(target, verdict)
            finally:
                verdict.expires = time.monotonic() + ROBOTS_TTL_S
                verdict.done.set()
        else:
            verdict.done.wait()
        if verdict.disallow_all:
            return False
        if verdict.allow_all or verdict.parser is None:
            return True
        return verdict.parser.can_fetch(self.cfg.user_agent, target.url)

    def _load_robots(self, target: _Target, verdict: _RobotsVerdict) -> None:
        """Fetch and parse robots.txt once per host, following RFC 9309's status rules."""
        default_port = 443 if target.scheme == "https" else 80
        netloc = target.host if target.port == default_port else f"{target.host}:{target.port}"
        if ":" in target.host:
            netloc = f"[{target.host}]" + ("" if target.port == default_port else f":{target.port}")
        exchange = self._get(f"{target.scheme}://{netloc}/robots.txt", [], check_robots=False, for_image=False)
        if exchange.reason is None and exchange.body is not None:
            parser = urllib.robotparser.RobotFileParser()
            parser.parse(exchange.body.decode("utf-8", errors="replace").splitlines())
            verdict.parser = parser
        elif exchange.status is not None and 400 <= exchange.status < 500 and exchange.status != 429:
            # 4xx ("unavailable"): crawl as if there were no robots.txt; RFC 9309 2.3.1.3 (401/403 included).
            verdict.allow_all = True
        else:
            # 5xx, 429 or unreachable: RFC 9309 2.3.1.4 says assume complete disallow.
            verdict.disallow_all = True
