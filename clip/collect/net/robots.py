"""robots.txt verdicts, fetched once per origin and cached, following RFC 9309.

Guarantees of `RobotsCache.allows(target)`:
- robots.txt of an origin (scheme, host, port) is requested at most once per 24 hours (RFC 9309's cache
  limit), however many threads ask at once: one of them fetches it and the others wait for its verdict;
- a 2xx body is parsed (the caller bounds it to ROBOTS_MAX_BYTES; RFC 9309 asks for at least 500 KiB);
  4xx other than 429 means "no robots.txt", everything allowed; 5xx, 429 or no response means disallow all;
- the cache holds at most 100,000 origins, dropping the oldest first.
The cache does no I/O of its own: the caller passes the function that GETs a robots.txt URL.
"""

from __future__ import annotations

import threading
import time
import urllib.robotparser
from collections.abc import Callable

from clip.collect.net.urls import Target

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB
ROBOTS_TTL_S = 24 * 3600.0  # RFC 9309: a cached robots.txt should not be used for more than 24 hours
_ROBOTS_CACHE_MAX = 100_000

# robots.txt URL -> (HTTP status or None when no response came, body or None unless the response was usable).
RobotsGet = Callable[[str], tuple[int | None, bytes | None]]


class _RobotsVerdict:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.parser: urllib.robotparser.RobotFileParser | None = None
        self.allow_all = False
        self.disallow_all = False
        self.expires = 0.0


def robots_url(target: Target) -> str:
    """The robots.txt URL of the target's origin (default ports left out, IPv6 literals bracketed)."""
    default_port = 443 if target.scheme == "https" else 80
    netloc = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host:
        netloc = f"[{target.host}]" + ("" if target.port == default_port else f":{target.port}")
    return f"{target.scheme}://{netloc}/robots.txt"


class RobotsCache:
    """Per-origin robots.txt verdicts for one user agent; thread-safe."""

    def __init__(self, user_agent: str, get: RobotsGet) -> None:
        self.user_agent = user_agent
        self._get = get
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[str, str, int], _RobotsVerdict] = {}

    def allows(self, target: Target) -> bool:
        key = target.origin
        with self._lock:
            verdict = self._verdicts.get(key)
            owner = verdict is None or (verdict.done.is_set() and verdict.expires <= time.monotonic())
            if owner:
                if len(self._verdicts) >= _ROBOTS_CACHE_MAX:
                    self._verdicts.pop(next(iter(self._verdicts)))  # oldest first (insertion order)
                verdict = self._verdicts[key] = _RobotsVerdict()
        assert verdict is not None
        if owner:
            try:
                self._load(target, verdict)
            finally:
                verdict.expires = time.monotonic() + ROBOTS_TTL_S
                verdict.done.set()
        else:
            verdict.done.wait()
        if verdict.disallow_all:
            return False
        if verdict.allow_all or verdict.parser is None:
            return True
        return verdict.parser.can_fetch(self.user_agent, target.url)

    def _load(self, target: Target, verdict: _RobotsVerdict) -> None:
        """Fetch and parse robots.txt once per origin, following RFC 9309's status rules."""
        status, body = self._get(robots_url(target))
        if body is not None:
            parser = urllib.robotparser.RobotFileParser()
            parser.parse(body.decode("utf-8", errors="replace").splitlines())
            verdict.parser = parser
        elif status is not None and 400 <= status < 500 and status != 429:
            # 4xx ("unavailable"): crawl as if there were no robots.txt; RFC 9309 2.3.1.3 (401/403 included).
            verdict.allow_all = True
        else:
            # 5xx, 429 or unreachable: RFC 9309 2.3.1.4 says assume complete disallow.
            verdict.disallow_all = True
