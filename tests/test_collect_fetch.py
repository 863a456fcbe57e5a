"""The collect stage's HTTP fetcher against a real HTTP server on 127.0.0.1 (tests/support/webserver.py).

Loopback only: addresses outside 127.0.0.0/8 appear solely as inputs to the pure SSRF guard or as answers of an
injected resolver, and a patched socket opener fails the test if anything but loopback is ever connected to.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from PIL import Image

from clip.collect.fetch import Fetcher, FetchResult
from clip.collect.net import connections as connections_module
from clip.collect.net.headers import opt_out_in_headers, parse_retry_after
from clip.collect.net.latency import latency_summary
from clip.collect.net.netguard import address_verdict
from clip.collect.net.resolver import ResolveError, Resolver, system_lookup
from clip.config import FetchConfig
from tests.support.webserver import ImageServer, Reply, make_image, make_pixel_bomb, self_signed_tls

pytestmark = pytest.mark.timeout(60)  # every request is bounded: a hang fails instead of stalling the suite

UA = "clip-pipeline-test/0.1 (+https://example.invalid/bot)"


def make_cfg(**overrides: object) -> FetchConfig:
    base: dict[str, object] = dict(
        threads=8,
        # Generous for requests that should succeed (the suite shares a loaded box); the timeout tests
        # set their own small values.
        timeout_s=2.0,
        total_timeout_s=6.0,
        retries=2,
        backoff_base_s=0.02,
        max_retry_after_s=1.0,
        max_bytes=2_000_000,
        user_agent=UA,
        allow_loopback=True,
        per_host_concurrency=8,
        per_host_rate=1000.0,
        min_size=32,
        max_aspect_ratio=3.0,
        max_side=64,
    )
    base.update(overrides)
    return FetchConfig(**base)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the fetcher connects to; anything outside loopback fails the test before connecting."""
    connected: list[str] = []
    real_open = connections_module._open_socket

    def guarded_open(address: str, port: int, timeout: float):  # noqa: ANN202
        if not (address.startswith("127.") or address == "::1"):
            pytest.fail(f"fetcher tried to connect to non-loopback address {address}")
        connected.append(address)
        return real_open(address, port, timeout)

    monkeypatch.setattr(connections_module, "_open_socket", guarded_open)
    return connected


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


def fetch_one(url: str, **overrides: object) -> FetchResult:
    with Fetcher(make_cfg(**overrides)) as fetcher:
        return fetcher.fetch(url)


# ---------------------------------------------------------------------------------------------------------
# pure functions: guard, X-Robots-Tag parsing, Retry-After


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.10", "private"),
        ("100.64.0.1", "private"),  # carrier-grade NAT
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("127.0.0.1", "loopback"),
        ("127.5.6.7", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("not-an-ip", "invalid"),
    ],
)
def test_guard_verdicts(address: str, verdict: str | None) -> None:
    assert address_verdict(address) == verdict


def test_guard_allow_switches() -> None:
    assert address_verdict("127.0.0.1", allow_loopback=True) is None
    assert address_verdict("::1", allow_loopback=True) is None
    # allow_loopback is loopback only: private, link-local and metadata stay refused
    assert address_verdict("10.0.0.1", allow_loopback=True) == "private"
    assert address_verdict("169.254.169.254", allow_loopback=True) == "metadata"
    assert address_verdict("fe80::1", allow_loopback=True) == "link_local"
    # allow_private lets every non-public address through (documented in FetchConfig)
    for address in ("10.0.0.1", "192.168.0.1", "127.0.0.1", "169.254.169.254", "fc00::1"):
        assert address_verdict(address, allow_private=True) is None


@pytest.mark.parametrize(
    ("values", "opted_out"),
    [
        (["noai"], True),
        (["noimageai"], True),
        (["noindex, noai"], True),
        (["NoImageAI"], True),
        (["noindex", "nofollow"], False),
        (["noindex, nofollow"], False),
        (["otherbot: noai"], False),  # scoped to another crawler
        (["clip-pipeline-test: noai"], True),  # scoped to us
        (["*: noimageai"], True),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
        ([], False),
    ],
)
def test_x_robots_tag_parsing(values: list[str], opted_out: bool) -> None:
    assert opt_out_in_headers(values, "clip-pipeline-test") is opted_out


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = datetime(2030, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(90.0)
    past = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(past, now=now.timestamp()) == 0.0


# ---------------------------------------------------------------------------------------------------------
# success and content


def test_fetch_ok_resizes_and_sends_user_agent(server: ImageServer) -> None:
    result = fetch_one(server.url("/img/200x100/1.jpg"))
    assert result.status == "ok" and result.reason is None, result
    assert result.image is not None
    assert (result.image.width, result.image.height) == (64, 32)  # longest side max_side=64, ratio kept
    decoded = Image.open(io.BytesIO(result.image.jpeg))
    assert decoded.format == "JPEG" and decoded.size == (64, 32)
    assert result.download_ms is not None and result.download_ms > 0
    assert UA in server.stats.user_agents


def test_png_and_octet_stream_are_decoded(server: ImageServer) -> None:
    assert fetch_one(server.url("/img/80x60/2.png")).status == "ok"
    url = server.route("/octet.bin", Reply(200, {"Content-Type": "application/octet-stream"}, make_image(80, 60)))
    assert fetch_one(url).status == "ok"


@pytest.mark.parametrize(
    ("reply", "status", "reason"),
    [
        (Reply(404, {"Content-Type": "text/plain"}, b"nope"), "failed", "http_404"),
        (Reply(403, {"Content-Type": "text/plain"}, b"no"), "failed", "http_403"),
        (Reply(200, {"Content-Type": "text/html"}, b"<html></html>"), "filtered", "content_type"),
        (Reply(200, {"Content-Type": "image/jpeg"}, b"this is not a jpeg at all"), "failed", "not_an_image"),
        (Reply.image(20, 20), "filtered", "too_small"),
        (Reply.image(400, 40), "filtered", "aspect_ratio"),
        (Reply(302, {"Location": "/missing-location"}, b""), "failed", "http_404"),  # redirect to a 404
    ],
    ids=["404", "403", "html", "garbage", "too_small", "aspect", "redirect_404"],
)
def test_content_failures(server: ImageServer, reply: Reply, status: str, reason: str) -> None:
    path = f"/content/{reason}/{reply.status}"
    result = fetch_one(server.route(path, reply))
    assert (result.status, result.reason) == (status, reason), result
    assert result.image is None
    assert result.retryable is False


def test_decompression_bomb(server: ImageServer) -> None:
    url = server.route("/bomb.png", Reply(200, {"Content-Type": "image/png"}, make_pixel_bomb(4000, 4000)))
    result = fetch_one(url, max_pixels=1_000_000)
    assert (result.status, result.reason) == ("filtered", "decompression_bomb")


def test_truncated_body(server: ImageServer) -> None:
    data = make_image(120, 90, seed=3)
    url = server.route(
        "/truncated.jpg",
        Reply(200, {"Content-Type": "image/jpeg"}, data[: len(data) // 2], content_length=len(data), close_after_body=True),
    )
    result = fetch_one(url)
    assert (result.status, result.reason) == ("failed", "truncated"), result


# ---------------------------------------------------------------------------------------------------------
# size limits: refused from the headers, or while streaming


def test_content_length_over_limit_is_refused_before_the_body(server: ImageServer) -> None:
    url = server.route(
        "/huge-declared.jpg",
        Reply(200, {"Content-Type": "image/jpeg"}, stream_bytes=50_000_000, hold_body_s=5.0),
    )
    result = fetch_one(url, max_bytes=1_000_000, total_timeout_s=10.0)
    assert (result.status, result.reason) == ("filtered", "too_large"), result
    assert server.stats.body_bytes["/huge-declared.jpg"] == 0


def test_streamed_body_over_limit_stops_reading(server: ImageServer) -> None:
    # No Content-Length: the limit can only be enforced while reading.
    url = server.route(
        "/huge-streamed.jpg", Reply(200, {"Content-Type": "image/jpeg"}, stream_bytes=40_000_000, content_length=None)
    )
    result = fetch_one(url, max_bytes=1_000_000, total_timeout_s=10.0)
    assert (result.status, result.reason) == ("filtered", "too_large"), result
    # The server could only push what the socket buffers absorbed after the client hung up.
    assert server.stats.body_bytes["/huge-streamed.jpg"] < 40_000_000


# ---------------------------------------------------------------------------------------------------------
# opt-out


@pytest.mark.parametrize("directive", ["noai", "noimageai", "noindex, noimageai"])
def test_x_robots_tag_opt_out_skips_the_body(server: ImageServer, directive: str) -> None:
    path = f"/optout/{directive.replace(', ', '-')}.jpg"
    body = make_image(100, 100, seed=4)
    url = server.route(path, Reply(200, {"Content-Type": "image/jpeg", "X-Robots-Tag": directive}, body, hold_body_s=5.0))
    result = fetch_one(url, total_timeout_s=10.0)
    assert (result.status, result.reason) == ("filtered", "opt_out_header"), result
    assert server.stats.body_bytes[path] == 0  # refused on the headers: no body byte was sent


def test_x_robots_tag_for_another_bot_is_ignored(server: ImageServer) -> None:
    url = server.route(
        "/optout-other.jpg", Reply.image(100, 100, headers={"X-Robots-Tag": "someotherbot: noai"})
    )
    assert fetch_one(url).status == "ok"


def test_x_robots_tag_ignored_when_disabled(server: ImageServer) -> None:
    url = server.route("/optout-disabled.jpg", Reply.image(100, 100, headers={"X-Robots-Tag": "noai"}))
    assert fetch_one(url, respect_x_robots_tag=False).status == "ok"


def test_robots_txt_disallow_fetched_once_per_host() -> None:
    with ImageServer() as srv:
        srv.route(
            "/robots.txt",
            Reply(
                200,
                {"Content-Type": "text/plain"},
                # Our own group wins over '*' (which would disallow everything); otherbot's does not apply.
                b"User-agent: otherbot\nDisallow: /img/\n\n"
                b"User-agent: clip-pipeline-test\nDisallow: /private/\nDisallow: /nobots/\n\n"
                b"User-agent: *\nDisallow: /\n",
            ),
        )
        urls = [srv.url(f"/img/100x80/{i}.jpg") for i in range(6)]
        urls += [srv.url(f"/private/{i}.jpg") for i in range(3)]
        urls += [srv.url(f"/nobots/{i}.jpg") for i in range(3)]
        with Fetcher(make_cfg(respect_robots_txt=True, threads=6)) as fetcher:
            results = dict(fetcher.fetch_many(urls))
        for i, url in enumerate(urls):
            expected = ("ok", None) if "/img/" in url else ("filtered", "robots_txt")
            assert (results[i].status, results[i].reason) == expected, url
        assert srv.stats.hits["/robots.txt"] == 1
        # Disallowed URLs were never requested.
        assert not any(path.startswith(("/private/", "/nobots/")) for path in srv.stats.hits)
    with ImageServer() as srv:  # only a '*' group: it applies to us
        srv.route("/robots.txt", Reply(200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n"))
        with Fetcher(make_cfg(respect_robots_txt=True)) as fetcher:
            assert fetcher.fetch(srv.url("/private/1.jpg")).reason == "robots_txt"
            assert fetcher.fetch(srv.url("/img/100x80/1.jpg")).status == "ok"
        assert srv.stats.hits["/robots.txt"] == 1


def test_robots_txt_missing_allows_and_server_error_disallows() -> None:
    with ImageServer() as srv:  # no /robots.txt route: 404 -> no restrictions
        assert fetch_one(srv.url("/img/100x80/1.jpg"), respect_robots_txt=True).status == "ok"
    with ImageServer() as srv:
        srv.route("/robots.txt", Reply(503, {"Content-Type": "text/plain"}, b"down"))
        result = fetch_one(srv.url("/img/100x80/1.jpg"), respect_robots_txt=True)
        assert (result.status, result.reason) == ("filtered", "robots_txt")  # RFC 9309: unreachable -> disallow


# ---------------------------------------------------------------------------------------------------------
# retries, Retry-After, timeouts


def test_500_then_success_is_retried(server: ImageServer) -> None:
    url = server.route("/flaky.jpg", [Reply(500, body=b"oops"), Reply(503, body=b"busy"), Reply.image(100, 80)])
    result = fetch_one(url)
    assert result.status == "ok", result
    assert server.stats.hits["/flaky.jpg"] == 3


def test_5xx_after_retries_is_retryable_failure(server: ImageServer) -> None:
    url = server.route("/always-500.jpg", Reply(500, body=b"oops"))
    result = fetch_one(url, retries=1)
    assert (result.status, result.reason, result.retryable) == ("failed", "http_500", True)
    assert server.stats.hits["/always-500.jpg"] == 2  # 1 try + 1 retry


def test_429_retry_after_seconds_then_success(server: ImageServer) -> None:
    url = server.route("/throttled.jpg", [Reply(429, {"Retry-After": "1"}, b"slow down"), Reply.image(100, 80)])
    started = time.monotonic()
    result = fetch_one(url)
    assert result.status == "ok", result
    assert server.stats.hits["/throttled.jpg"] == 2
    assert time.monotonic() - started >= 0.9  # Retry-After was honoured (a lower bound: load only adds)


def test_429_retry_after_http_date_is_capped(server: ImageServer) -> None:
    far = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    url = server.route("/throttled-date.jpg", [Reply(429, {"Retry-After": far}, b""), Reply.image(100, 80)])
    # An hour-long Retry-After is capped at max_retry_after_s (the module timeout would catch a real wait).
    result = fetch_one(url, max_retry_after_s=0.2)
    assert result.status == "ok", result
    assert server.stats.hits["/throttled-date.jpg"] == 2


def test_429_exhausted_is_retryable(server: ImageServer) -> None:
    url = server.route("/throttled-forever.jpg", Reply(429, {"Retry-After": "0"}, b""))
    result = fetch_one(url, retries=2)
    assert (result.status, result.reason, result.retryable) == ("failed", "http_429", True)
    assert server.stats.hits["/throttled-forever.jpg"] == 3


def test_slow_response_times_out(server: ImageServer) -> None:
    url = server.route("/slow.jpg", Reply.image(100, 80, delay_s=3.0))
    result = fetch_one(url, retries=0, timeout_s=0.5)
    assert (result.status, result.reason, result.retryable) == ("failed", "timeout", True)


def test_slow_drip_body_hits_the_total_deadline(server: ImageServer) -> None:
    # Each byte arrives well within the 2 s read timeout, but the whole body would take ~25 s.
    body = make_image(100, 80, seed=6)[:250]
    url = server.route(
        "/drip.jpg", Reply(200, {"Content-Type": "image/jpeg"}, body, drip_s=0.1, drip_chunk=1)
    )
    started = time.monotonic()
    result = fetch_one(url, retries=0, timeout_s=2.0, total_timeout_s=1.0)
    assert (result.status, result.reason, result.retryable) == ("failed", "timeout", True)
    assert time.monotonic() - started < 20  # bounded far below the 25 s the drip would take


def test_keep_alive_connection_closed_by_server_is_reopened() -> None:
    # The server drops each connection after answering; the fetcher pools it and finds it dead on reuse.
    with ImageServer() as srv:
        url = srv.route("/dropped.jpg", Reply.image(100, 80, drop_connection=True))
        with Fetcher(make_cfg(retries=0)) as fetcher:  # no retries: the reopen alone must save the request
            results = [fetcher.fetch(url) for _ in range(4)]
        assert [r.status for r in results] == ["ok"] * 4, results
        assert srv.stats.hits["/dropped.jpg"] == 4 and srv.stats.connections == 4


def test_keep_alive_connections_are_reused() -> None:
    with ImageServer() as srv:
        with Fetcher(make_cfg(threads=2)) as fetcher:
            results = [fetcher.fetch(srv.url(f"/img/100x80/1.jpg?n={i}")) for i in range(5)]
        assert all(r.status == "ok" for r in results)
        assert srv.stats.connections == 1


def test_connection_refused_is_retryable() -> None:
    probe = ImageServer()
    port = probe.port
    probe.stop()  # the port is now closed
    result = fetch_one(f"http://127.0.0.1:{port}/img/10x10/0.jpg", retries=1)
    assert (result.status, result.reason, result.retryable) == ("failed", "connection", True)


def test_bad_urls() -> None:
    for url in ("ftp://127.0.0.1/x.jpg", "file:///etc/passwd", "not a url", "http:///nohost.jpg", "http://h:99999/"):
        result = fetch_one(url)
        assert (result.status, result.reason) == ("failed", "bad_url"), url


def test_raw_spaces_and_unicode_in_path_are_percent_encoded(server: ImageServer) -> None:
    server.route("/caf%C3%A9%20photo.jpg", Reply.image(100, 80))
    result = fetch_one(server.url("/café photo.jpg"))
    assert result.status == "ok", result
    assert result.url == server.url("/café photo.jpg")  # the result names the URL as given
    # CR/LF cannot smuggle a header: urlsplit drops them (as WHATWG URL parsing does), the space is encoded.
    assert fetch_one(server.url("/a\r\nX-Injected: 1")).reason == "http_404"
    assert server.stats.hits["/aX-Injected:%201"] == 1


def test_dns_failure() -> None:
    def lookup(host: str, port: int) -> list[str]:
        raise ResolveError(f"no such host {host}")

    def flaky_lookup(host: str, port: int) -> list[str]:
        raise ResolveError(f"resolver timed out for {host}", temporary=True)

    with Fetcher(make_cfg(), lookup=lookup) as fetcher:
        result = fetcher.fetch("http://nowhere.test/x.jpg")
    assert (result.status, result.reason, result.retryable) == ("failed", "dns", False)
    with Fetcher(make_cfg(), lookup=flaky_lookup) as fetcher:
        result = fetcher.fetch("http://nowhere.test/x.jpg")
    assert (result.status, result.reason, result.retryable) == ("failed", "dns", True)


def test_stuck_dns_lookup_is_bounded_by_timeout_and_not_cached(server: ImageServer) -> None:
    # A resolver that never answers for one name (as getaddrinfo can block for tens of seconds): its URLs must
    # fail with a retryable dns error after timeout_s, while other hosts in the same batch are fetched.
    release = threading.Event()
    stuck_entered = threading.Event()
    stuck_returned = threading.Event()
    calls: list[str] = []
    lock = threading.Lock()

    def lookup(host: str, port: int) -> list[str]:
        with lock:
            calls.append(host)
        if host == "stuck.test":
            stuck_entered.set()
            release.wait(30)  # far past the pytest timeout of the module: only release ends it in time
            stuck_returned.set()
        return ["127.0.0.1"]

    urls = [
        f"http://stuck.test:{server.port}/img/100x80/1.jpg",
        f"http://fine.test:{server.port}/img/100x80/1.jpg",
        f"http://stuck.test:{server.port}/img/100x80/2.jpg",
        f"http://other.test:{server.port}/img/100x80/2.jpg",
    ]
    try:
        with Fetcher(make_cfg(threads=4, timeout_s=0.3, retries=0), lookup=lookup) as fetcher:
            started = time.monotonic()
            single = fetcher.fetch(urls[0])
            single_s = time.monotonic() - started
            results = dict(fetcher.fetch_many(urls))
            # The fetcher gave up while the lookup was still blocked: it did not wait for it.
            assert stuck_entered.is_set() and not stuck_returned.is_set()
            assert single_s < 5.0, single_s  # bounded by timeout_s, not by the 30 s the lookup would take
            for result in (single, results[0], results[2]):
                assert (result.status, result.reason, result.retryable) == ("failed", "dns", True), result
            assert results[1].status == "ok" and results[3].status == "ok", results
            # Every request after the first waited on the same running lookup: one thread for the stuck host.
            assert calls.count("stuck.test") == 1, calls

            # Not cached as a failure: once the resolver answers, the host is fetched again.
            release.set()
            assert stuck_returned.wait(5)
            late = fetcher.fetch(f"http://stuck.test:{server.port}/img/100x80/3.jpg")
            assert late.status == "ok", late
            assert calls.count("stuck.test") == 1, calls  # the late answer was cached, no second lookup
    finally:
        release.set()  # never leave the lookup thread blocked, even when an assertion failed
    deadline = time.monotonic() + 5.0
    while any(t.name.startswith("dns-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dns-")]  # close() let them exit


def test_resolver_timeout_then_late_negative_answer_is_cached() -> None:
    # A late NXDOMAIN is cached as the permanent failure it is; the timed-out attempt itself was temporary.
    release = threading.Event()
    calls: list[str] = []

    def lookup(host: str, port: int) -> list[str]:
        calls.append(host)
        release.wait(30)
        raise ResolveError(f"no such host {host}")

    resolver = Resolver(ttl_s=60, lookup=lookup, timeout_s=0.2)
    try:
        with pytest.raises(ResolveError) as first:
            resolver.resolve("gone.test", 80)
        assert first.value.temporary
        release.set()
        deadline = time.monotonic() + 5.0
        while resolver._running and time.monotonic() < deadline:  # the abandoned lookup finishing on its own
            time.sleep(0.01)
        for _ in range(2):
            with pytest.raises(ResolveError) as later:
                resolver.resolve("gone.test", 80)
            assert not later.value.temporary
        assert calls == ["gone.test"]
    finally:
        release.set()
        resolver.close()


# ---------------------------------------------------------------------------------------------------------
# SSRF guard in the fetcher, redirects


def test_private_and_metadata_hosts_refused_before_connecting(loopback_only: list[str]) -> None:
    answers = {
        "internal.test": ["10.0.0.5"],
        "metadata.test": ["169.254.169.254"],
        "metadata6.test": ["fd00:ec2::254"],
        "alibaba.test": ["100.100.100.200"],
        "lan.test": ["192.168.1.20"],
        "linklocal.test": ["fe80::1"],
    }
    with Fetcher(make_cfg(allow_loopback=True), lookup=lambda host, port: answers[host]) as fetcher:
        for host in answers:
            result = fetcher.fetch(f"http://{host}/latest/meta-data/")
            assert (result.status, result.reason) == ("filtered", "blocked_address"), host
        # IP literals are checked too, without a lookup
        for literal in ("http://10.1.1.1/x.jpg", "http://[fd00:ec2::254]/x.jpg", "http://169.254.169.254/"):
            assert fetcher.fetch(literal).reason == "blocked_address", literal
    assert loopback_only == []  # nothing was connected to


def test_loopback_refused_unless_allowed(server: ImageServer, loopback_only: list[str]) -> None:
    result = fetch_one(server.url("/img/100x80/1.jpg"), allow_loopback=False)
    assert (result.status, result.reason) == ("filtered", "blocked_address")
    assert loopback_only == []
    assert fetch_one(server.url("/img/100x80/1.jpg"), allow_loopback=False, allow_private_addresses=True).status == "ok"


def test_only_checked_addresses_are_connected(server: ImageServer, loopback_only: list[str]) -> None:
    # A name with a private and a loopback answer: only the address that passed the guard is ever used.
    with Fetcher(make_cfg(), lookup=lambda host, port: ["10.9.9.9", "127.0.0.1"]) as fetcher:
        result = fetcher.fetch(f"http://mixed.test:{server.port}/img/100x80/7.jpg")
    assert result.status == "ok", result
    assert set(loopback_only) == {"127.0.0.1"}


def test_redirect_to_refused_address_never_connects(server: ImageServer) -> None:
    try:
        target = ImageServer(host="127.0.0.2").start()
    except OSError as exc:  # pragma: no cover - 127.0.0.2 routes to lo on Linux
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")
    try:
        redirect_url = server.route(
            "/redirect-away.jpg", Reply(302, {"Location": target.url("/img/100x80/1.jpg")}, b"")
        )
        # Loopback in general is refused; only the first server's address is allowed.
        with Fetcher(make_cfg(allow_loopback=False), allowed_addresses={"127.0.0.1"}) as fetcher:
            result = fetcher.fetch(redirect_url)
        assert (result.status, result.reason) == ("filtered", "blocked_address"), result
        assert server.stats.hits["/redirect-away.jpg"] == 1
        assert target.stats.connections == 0
        # The same redirect with the target allowed does reach it (the test can fail the other way too).
        with Fetcher(make_cfg(allow_loopback=True)) as fetcher:
            assert fetcher.fetch(redirect_url).status == "ok"
        assert target.stats.connections == 1
    finally:
        target.stop()


def test_https_connects_to_checked_ip_with_name_for_sni_and_certificate(
    tmp_path: Path, loopback_only: list[str]
) -> None:
    server_ctx, client_ctx = self_signed_tls(["img.test"], str(tmp_path))
    with ImageServer(tls_context=server_ctx) as srv:
        answers = {"img.test": ["127.0.0.1"], "wrong-name.test": ["127.0.0.1"]}
        with Fetcher(make_cfg(), lookup=lambda h, p: answers[h], ssl_context=client_ctx) as fetcher:
            ok = fetcher.fetch(f"https://img.test:{srv.port}/img/100x80/3.jpg")
            # Same IP, a name the certificate does not cover: refused, so the check uses the name, not the IP.
            mismatch = fetcher.fetch(f"https://wrong-name.test:{srv.port}/img/100x80/3.jpg")
        assert ok.status == "ok", ok
        assert (mismatch.status, mismatch.reason) == ("failed", "tls")
        assert f"img.test:{srv.port}" in srv.stats.max_active_by_host  # Host header carried the name
    assert set(loopback_only) == {"127.0.0.1"}


def test_redirects_followed_and_limited(server: ImageServer) -> None:
    server.route("/hop1", Reply(301, {"Location": "/hop2"}, b""))
    server.route("/hop2", Reply(307, {"Location": "/img/100x80/9.jpg"}, b""))
    assert fetch_one(server.url("/hop1")).status == "ok"
    server.route("/loop", Reply(302, {"Location": "/loop"}, b""))
    result = fetch_one(server.url("/loop"), max_redirects=3)
    assert (result.status, result.reason) == ("failed", "too_many_redirects")
    assert server.stats.hits["/loop"] == 4  # the first request + 3 redirects followed
    url = server.route("/to-ftp", Reply(302, {"Location": "ftp://127.0.0.1/x.jpg"}, b""))
    assert fetch_one(url).reason == "bad_url"


# ---------------------------------------------------------------------------------------------------------
# resolver cache, per-host limits, concurrency, stats


def test_host_resolved_once_for_many_concurrent_urls(server: ImageServer) -> None:
    calls: list[str] = []
    lock = threading.Lock()

    def slow_lookup(host: str, port: int) -> list[str]:
        with lock:
            calls.append(host)
        time.sleep(0.2)  # every thread asks while the first lookup is still in flight
        return ["127.0.0.1"]

    urls = [f"http://img.test:{server.port}/img/100x80/{i % 5}.jpg?n={i}" for i in range(40)]
    with Fetcher(make_cfg(threads=16), lookup=slow_lookup) as fetcher:
        results = dict(fetcher.fetch_many(urls))
        stats = fetcher.latency_stats()
    assert sorted(results) == list(range(40))
    assert all(r.status == "ok" for r in results.values())
    assert calls == ["img.test"]
    assert stats["lookups"] == 1 and stats["requests"] >= 40
    assert stats["dns_ms"]["median"] >= 150
    assert stats["download_ms"]["median"] is not None
    assert stats["download_ms"]["p99"] >= stats["download_ms"]["median"]
    shard = latency_summary(results.values())  # per-shard figures from the results themselves
    assert shard["requests"] == 40 and shard["lookups"] == 40  # every URL has its (mostly cached) dns time
    assert shard["dns_ms"]["p99"] >= 150 and shard["download_ms"]["median"] is not None


def test_localhost_through_the_system_resolver_is_looked_up_once(server: ImageServer) -> None:
    calls: list[str] = []

    def counting(host: str, port: int) -> list[str]:
        calls.append(host)
        return system_lookup(host, port)

    urls = [f"http://localhost:{server.port}/img/100x80/1.jpg?n={i}" for i in range(10)]
    with Fetcher(make_cfg(threads=4), lookup=counting) as fetcher:
        statuses = [r.status for _, r in fetcher.fetch_many(urls)]
    assert statuses == ["ok"] * 10
    assert calls == ["localhost"]


def test_resolver_ttl_expiry() -> None:
    calls: list[str] = []
    resolver = Resolver(ttl_s=0.05, lookup=lambda host, port: calls.append(host) or ["127.0.0.1"])
    resolver.resolve("a.test", 80)
    resolver.resolve("a.test", 80)
    assert calls == ["a.test"]
    time.sleep(0.1)
    resolver.resolve("a.test", 80)
    assert calls == ["a.test", "a.test"]
    assert resolver.resolve("127.0.0.1", 80)[0] == ["127.0.0.1"] and len(calls) == 2  # literals: no lookup


def test_per_host_concurrency_limit_holds() -> None:
    # Two names for the same server: the limit is per host name:port, so each name gets its own slots.
    with ImageServer(request_delay_s=0.05) as srv:
        urls = [f"http://{h}.test:{srv.port}/img/100x80/{i % 3}.jpg?n={i}" for i in range(30) for h in ("a", "b")]
        with Fetcher(make_cfg(threads=24, per_host_concurrency=3), lookup=lambda h, p: ["127.0.0.1"]) as fetcher:
            results = list(fetcher.fetch_many(urls))
        assert len(results) == 60 and all(r.status == "ok" for _, r in results)
        by_host = srv.stats.max_active_by_host
        assert by_host[f"a.test:{srv.port}"] <= 3 and by_host[f"b.test:{srv.port}"] <= 3, by_host
        assert srv.stats.max_active <= 6
        assert srv.stats.max_active >= 2  # requests did overlap, so the limit had something to hold back


def test_per_host_rate_limit() -> None:
    with ImageServer() as srv:
        urls = [srv.url(f"/img/100x80/1.jpg?n={i}") for i in range(12)]
        started = time.monotonic()
        with Fetcher(make_cfg(threads=8, per_host_concurrency=2, per_host_rate=20.0)) as fetcher:
            assert all(r.status == "ok" for _, r in fetcher.fetch_many(urls))
        # 2 tokens saved up, then 20/s: the last of 12 requests cannot start before 0.5 s (lower bound only).
        assert time.monotonic() - started >= 0.45


def test_fetch_many_mixed_batch_every_url_answered(server: ImageServer) -> None:
    server.route("/mixed-500.jpg", Reply(500, body=b""))
    server.route("/mixed-slow.jpg", Reply.image(100, 80, delay_s=3.0))
    urls = [
        server.url("/img/100x80/1.jpg"),
        server.url("/does-not-exist.jpg"),
        server.url("/mixed-500.jpg"),
        server.url("/mixed-slow.jpg"),
        "gopher://127.0.0.1/x",
        server.url("/img/20x20/1.jpg"),
    ] * 3
    with Fetcher(make_cfg(retries=1, threads=6, timeout_s=1.0, total_timeout_s=2.5)) as fetcher:
        results = dict(fetcher.fetch_many(urls))
    assert sorted(results) == list(range(len(urls)))
    expected = ["ok", "http_404", "http_500", "timeout", "bad_url", "too_small"] * 3
    assert [results[i].reason or results[i].status for i in range(len(urls))] == expected
