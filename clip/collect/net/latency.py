"""Latency figures (median, p99) for DNS lookups and downloads, in bounded memory.

Guarantees: counts are exact; medians and p99s come from a uniform sample of at most 65,536 values per figure
(so a run of any length costs the same memory), drawn with a fixed seed (the same inputs give the same
figures). `LatencyRecorder` is thread-safe; `latency_summary` and `LatencyRecorder.stats` return the same
shape: {"dns_ms": {"median", "p99"}, "download_ms": {"median", "p99"}, "lookups": int, "requests": int}.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable
from typing import Protocol

_RESERVOIR_SIZE = 65_536  # latency samples kept per figure; counts stay exact


class Reservoir:
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


def _figures(dns: Reservoir, download: Reservoir, requests: int) -> dict:
    return {"dns_ms": dns.summary(), "download_ms": download.summary(), "lookups": dns.count, "requests": requests}


class LatencyRecorder:
    """Run-wide figures shared by every fetcher thread: real DNS lookups, downloads, requests sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dns_ms = Reservoir()
        self._download_ms = Reservoir()
        self._requests = 0

    def record_lookup(self, ms: float) -> None:
        with self._lock:
            self._dns_ms.add(ms)

    def record_download(self, ms: float) -> None:
        with self._lock:
            self._download_ms.add(ms)

    def count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def stats(self) -> dict:
        """Median and p99 of DNS lookups (real ones, not cache hits) and downloads, with counts."""
        with self._lock:
            return _figures(self._dns_ms, self._download_ms, self._requests)


class TimedResult(Protocol):
    """What `latency_summary` reads of a result (`clip.collect.fetch.FetchResult` has both)."""

    dns_ms: float | None
    download_ms: float | None


def latency_summary(results: Iterable[TimedResult]) -> dict:
    """Per-shard latency figures from its results, in the shape of `Fetcher.latency_stats()`.

    DNS here is the time each URL spent resolving (cache hits included, ~0 ms), unlike the per-run figure
    which covers real lookups only.
    """
    dns, download = Reservoir(), Reservoir()
    count = 0
    for result in results:
        count += 1
        if result.dns_ms is not None:
            dns.add(result.dns_ms)
        if result.download_ms is not None:
            download.add(result.download_ms)
    return _figures(dns, download, count)
