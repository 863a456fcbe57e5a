"""Polite, bounded, SSRF-safe concurrent image fetcher for the collect stage.

One `Fetcher` per process; it is thread-safe and owns a thread pool, keep-alive connection pools, a shared
caching resolver, and per-host limits. Each URL ends in a `FetchResult` with status ok / failed / filtered and
a reason; nothing raises for a bad URL or a misbehaving server.

    with Fetcher(cfg.collect.fetch) as fetcher:
        for index, result in fetcher.fetch_many(urls):   # completion order
            if result.status == "ok":
                write(result.image.jpeg)
        print(fetcher.latency_stats())

This module is the request flow; the parts it is built from live in `clip.collect.net` (one job each).
What it does for every request:
- resolves the host once per `dns_ttl_s` (single flight, `net.resolver`), each real lookup bounded by
  `timeout_s` (one that overruns fails the URL with a retryable `dns` and is not cached), checks every
  address with the SSRF guard (`net.netguard`) and connects only to an address that passed: the socket is
  opened to that IP while the Host header and TLS SNI carry the name (`net.connections`), so a second DNS
  answer cannot redirect it (rebinding);
- follows redirects itself (`max_redirects`), checking each hop again (scheme, guard, robots.txt: `net.robots`);
- holds a per-host slot (`per_host_concurrency`) and a per-host token (`per_host_rate` req/s; `net.limits`);
- bounds connect and each read by `timeout_s` and the whole exchange by a deadline (`total_timeout_s`) that a
  watchdog enforces by shutting the socket (`net.watchdog`), so a slow-drip server cannot hold a worker;
- retries 429 / 5xx / timeouts / connection errors with exponential backoff or the server's Retry-After
  (seconds or HTTP date, capped at `max_retry_after_s`);
- reads X-Robots-Tag (noai, noimageai), the status, Content-Type and Content-Length before any of the body
  (`net.headers`), and stops reading past `max_bytes`;
- decodes and validates the image with `clip.collect.images.process_image`.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from types import TracebackType
from urllib.parse import urljoin

from clip.collect.images import ImageRejected, ProcessedImage, process_image
from clip.collect.net.connections import ConnectionPool, PinnedConnection, PoolKey, pinned_connection
from clip.collect.net.exchange import REDIRECT_STATUSES, Exchange, exchange_once
from clip.collect.net.headers import bot_name_of, parse_retry_after, refusal_in_headers
from clip.collect.net.latency import LatencyRecorder
from clip.collect.net.limits import HostLimiter
from clip.collect.net.netguard import address_verdict
from clip.collect.net.reasons import FAILED, OK, result_status
from clip.collect.net.resolver import Lookup, ResolveError, Resolver
from clip.collect.net.robots import ROBOTS_MAX_BYTES, RobotsCache
from clip.collect.net.urls import Target, parse_url
from clip.collect.net.watchdog import Watchdog
from clip.config import FetchConfig

log = logging.getLogger(__name__)


@dataclass
class FetchResult:
    """One URL's outcome.

    Reasons when failed: http_<status>, timeout, connection, dns, tls, truncated, bad_response, bad_url,
    too_many_redirects, not_an_image (and error_<Exception> for a bug). When filtered (our policy, see
    `clip.collect.net.reasons.FILTERED_REASONS`): opt_out_header, robots_txt, blocked_address, too_large,
    content_type, too_small, aspect_ratio, decompression_bomb. `retryable` marks failures a later run may fix:
    timeout, connection, 429 / 5xx (after this run's retries), and a temporary DNS failure (the resolver said
    "try again", or the lookup overran `timeout_s`); NXDOMAIN / no address is not retryable.
    """

    url: str
    status: str  # "ok" | "failed" | "filtered"
    reason: str | None = None  # None when ok; e.g. "http_404", "timeout", "opt_out_header" (see module doc)
    retryable: bool = False  # timeouts, connection errors, 429 and 5xx once retries were exhausted
    image: ProcessedImage | None = None
    dns_ms: float | None = None  # time this URL spent resolving (cache hits ~0); None if it never got that far
    download_ms: float | None = None  # request sent -> body read, for the final successful exchange


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
        self._latency = LatencyRecorder()
        # getaddrinfo has no timeout of its own: each real lookup gets the same bound as a connect or read.
        self.resolver = Resolver(
            cfg.dns_ttl_s, lookup, on_lookup=self._latency.record_lookup, timeout_s=cfg.timeout_s
        )
        self._limiter = HostLimiter(cfg.per_host_concurrency, cfg.per_host_rate)
        self._pool = ConnectionPool(cfg.per_host_concurrency)
        self._watchdog = Watchdog()
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._robots = RobotsCache(cfg.user_agent, self._get_robots_txt)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._closed = False
        self._bot_name = bot_name_of(cfg.user_agent)
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
        return self._latency.stats()

    # -- internals ---------------------------------------------------------------------------------------

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="fetch")
            return self._executor

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

    def _get(self, url: str, dns_total: list[float], *, check_robots: bool, for_image: bool) -> Exchange:
        """GET `url` following redirects (each hop guarded, robots-checked and retried)."""
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            target = parse_url(current)
            if target is None:
                return Exchange(reason="bad_url")
            try:
                addresses, waited_ms = self.resolver.resolve(target.host, target.port)
            except ResolveError as exc:  # temporary: EAI_AGAIN or no answer within timeout_s
                return Exchange(reason="dns", retryable=exc.temporary)
            dns_total.append(waited_ms)
            usable = [a for a in addresses if self._address_allowed(a)]
            if not usable:
                return Exchange(reason="blocked_address")
            # After the guard, so a refused host is reported as such and its robots.txt is never requested.
            if check_robots and not self._robots.allows(target):
                return Exchange(reason="robots_txt")
            exchange = self._get_with_retries(target, usable, for_image)
            if exchange.reason is None and exchange.status in REDIRECT_STATUSES:
                location = exchange.headers.get("Location") if exchange.headers is not None else None
                if not location:
                    return Exchange(reason=f"http_{exchange.status}")
                current = urljoin(current, location.strip())
                continue
            return exchange
        return Exchange(reason="too_many_redirects")

    def _get_with_retries(self, target: Target, addresses: list[str], for_image: bool) -> Exchange:
        attempts = (self.cfg.retries if for_image else 0) + 1
        exchange = Exchange(reason="connection")
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

    def _exchange(self, target: Target, addresses: list[str], for_image: bool) -> Exchange:
        """One request/response on a pooled or new connection; a stale pooled connection is retried fresh."""
        key = target.origin
        pooled = self._pool.take(key)
        if pooled is not None:
            exchange = self._exchange_on(pooled, key, target, for_image, reused=True)
            if exchange is not None:
                return exchange
        last = Exchange(reason="connection", retryable=True)
        for address in addresses:  # every one of them passed the guard
            conn = pinned_connection(
                target.scheme, target.host, target.port, address, self.cfg.timeout_s, self._ssl_context
            )
            exchange = self._exchange_on(conn, key, target, for_image, reused=False)
            assert exchange is not None
            if exchange.reason not in ("connect_failed", "connect_timeout"):
                return exchange
            last = Exchange(
                reason="timeout" if exchange.reason == "connect_timeout" else "connection", retryable=True
            )
        return last

    def _exchange_on(
        self, conn: PinnedConnection, key: PoolKey, target: Target, for_image: bool, *, reused: bool
    ) -> Exchange | None:
        """None only when a reused connection turned out dead before any response (caller opens a new one)."""
        self._latency.count_request()

        def release(reusable: bool) -> None:
            # Checked after the exchange: a connection finished while closing must not outlive the pool.
            if reusable and not self._closed:
                self._pool.put(key, conn)
            else:
                conn.close()

        return exchange_once(
            conn,
            target.path,
            {
                "User-Agent": self.cfg.user_agent,
                "Accept": "image/*,*/*;q=0.8" if for_image else "text/plain,*/*;q=0.8",
                "Accept-Encoding": "identity",
            },
            watchdog=self._watchdog,
            total_timeout_s=self._total_timeout_s,
            limit=self.cfg.max_bytes if for_image else ROBOTS_MAX_BYTES,
            oversize_refused=for_image,
            refuse=self._refuse_by_headers if for_image else None,
            on_download=self._latency.record_download if for_image else None,
            reused=reused,
            release=release,
        )

    def _refuse_by_headers(self, headers: Message) -> str | None:
        """Reasons to stop before reading an image's body: AI opt-out, non-image content type."""
        return refusal_in_headers(
            headers, bot_name=self._bot_name, respect_x_robots_tag=self.cfg.respect_x_robots_tag
        )

    # -- robots.txt --------------------------------------------------------------------------------------

    def _get_robots_txt(self, url: str) -> tuple[int | None, bytes | None]:
        """GET a robots.txt for `RobotsCache`: (status, body when the response was usable).

        Through the same guarded, pinned, rate-limited path as images, but without a robots check of its own
        and without retries.
        """
        exchange = self._get(url, [], check_robots=False, for_image=False)
        return exchange.status, exchange.body if exchange.reason is None else None
