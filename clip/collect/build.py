"""Building one raw shard from its planned candidates: images fetched or loaded, validated, written with a record.

`build_shard` is the shard task of the collect stage (top level: Dask pickles it by reference). It writes
`raw-NNNNN.tar` through `RawOutput` (temporary name, then rename) and then the shard's done-record, so a
record on disk means its tar is complete. The record lists every planned candidate with its status, and a
fingerprint of everything that decided the shard's bytes (`shard_fingerprint`): a rerun reuses a shard only
when the fingerprint still matches.

Fetchers are shared per process (`shared_fetcher`): their DNS cache, connection pools and per-host limits then
span every shard that process builds. When several processes fetch at once, a shard's URLs are split by the
process that owns their host (`split_by_owner`, `clip.collect.net.limits.host_owner`): `fetch_entries` runs
once per owner, in that owner's process, and `write_fetched_shard` writes the shard from the results. Every
host is then fetched by one process, and the configured per-host concurrency and rate hold for the whole run.
The shard's bytes do not depend on which process fetched what.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from clip.collect.images import ImageRejected, encode_image, process_image
from clip.collect.net.limits import host_owner
from clip.collect.sources import CandidateSource, Partition
from clip.collect.writer import RawOutput
from clip.config import CollectConfig, FetchConfig, StorageConfig
from clip.formats.raw import RECORDS_DIR, RawSample, raw_record_name, raw_shard_name

RECORD_VERSION = 2  # 2: the sample JSON carries `color` (so dedup never decodes); a rerun rebuilds v1 shards


@dataclass
class ShardEntry:
    """One kept candidate as planned: its place in the source and the key and query it was given."""

    candidate: int  # global candidate id
    partition: int
    row: int
    key: str
    query: str
    caption: str
    url: str | None


@dataclass
class ShardTask:
    """One raw shard to build: its index, the fingerprint its record must carry, its entries in key order."""

    index: int
    fingerprint: str
    entries: list[ShardEntry]


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (a stable fingerprint of plain data)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def shard_fingerprint(cfg: CollectConfig, source_name: str, entries: list[ShardEntry]) -> str:
    """What decides a shard's bytes: record version, source, image settings and every entry."""
    fetch = cfg.fetch
    image_settings = [fetch.min_size, fetch.max_aspect_ratio, fetch.max_pixels, fetch.max_side, fetch.jpeg_quality]
    return digest([RECORD_VERSION, source_name, image_settings,
                   [(e.candidate, e.key, e.query, e.caption, e.url) for e in entries]])


def _sample_meta(entry: ShardEntry, source_name: str, image: Any) -> dict[str, Any]:
    return {
        "key": entry.key, "url": entry.url, "caption": entry.caption, "query": entry.query, "source": source_name,
        "width": image.width, "height": image.height, "sha256": image.sha256, "phash": image.phash,
        "color": image.color,
    }


_SHARED_FETCHERS: dict[tuple[int, str], Any] = {}
_SHARED_FETCHERS_LOCK = threading.Lock()


def shared_fetcher(fetch_cfg: FetchConfig) -> Any:
    """One Fetcher per process and fetch config, reused by every shard task that process runs.

    Its resolver cache, connection pools and per-host limits then span the whole run rather than one shard:
    a pool of many URLs on few hosts does one look-up per host (per TTL), and the per-host concurrency and
    rate limits hold across shards built by the same process.
    """
    from clip.collect.fetch import Fetcher

    key = (os.getpid(), fetch_cfg.model_dump_json())
    with _SHARED_FETCHERS_LOCK:
        fetcher = _SHARED_FETCHERS.get(key)
        if fetcher is None:
            fetcher = _SHARED_FETCHERS[key] = Fetcher(fetch_cfg)
        return fetcher


def close_shared_fetchers() -> None:
    """Close this process's shared fetchers (their connection pools and resolver threads)."""
    with _SHARED_FETCHERS_LOCK:
        for fetcher in _SHARED_FETCHERS.values():
            fetcher.close()
        _SHARED_FETCHERS.clear()


@dataclass
class FetchedEntries:
    """What `fetch_entries` returns: (entry index in the shard, result) pairs and the seconds they took."""

    results: list[tuple[int, Any]]  # (index into ShardTask.entries, clip.collect.fetch.FetchResult)
    seconds: float


def split_by_owner(task: ShardTask, owners: int) -> dict[int, list[tuple[int, str]]]:
    """The shard's URLs grouped by the process that owns their host: owner -> [(entry index, url)], in order."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for i, entry in enumerate(task.entries):
        if entry.url:
            groups.setdefault(host_owner(entry.url, owners), []).append((i, entry.url))
    return groups


def fetch_entries(fetch_cfg: FetchConfig, items: list[tuple[int, str]]) -> FetchedEntries:
    """Fetch (entry index, url) items with this process's shared fetcher; results in the order of `items`."""
    start = time.monotonic()
    results: list[Any] = [None] * len(items)
    for j, result in shared_fetcher(fetch_cfg).fetch_many([url for _, url in items]):
        results[j] = result
    return FetchedEntries([(i, result) for (i, _), result in zip(items, results, strict=True)],
                          time.monotonic() - start)


def write_fetched_shard(
    source_name: str, output_uri: str, storage_cfg: StorageConfig | None, task: ShardTask, *fetched: FetchedEntries,
) -> dict[str, Any]:
    """Write a URL source's shard from its fetch results (one `FetchedEntries` per owner); returns the record.

    The record's `seconds` is the slowest fetch group plus the writing: the groups run at the same time.
    """
    from clip.collect.net.latency import latency_summary

    start = time.monotonic()
    statuses: dict[int, dict[str, Any]] = {}
    samples: dict[int, RawSample] = {}
    for i, entry in enumerate(task.entries):
        if not entry.url:
            statuses[i] = {"status": "failed", "reason": "missing_url", "retryable": False}
    results = [pair for group in fetched for pair in group.results]
    for i, result in results:
        timing = {"dns_ms": result.dns_ms, "download_ms": result.download_ms}
        if result.status == "ok" and result.image is not None:
            entry = task.entries[i]
            samples[i] = RawSample(entry.key, result.image.jpeg, entry.caption,
                                   _sample_meta(entry, source_name, result.image))
            statuses[i] = {"status": "ok", "reason": None, "retryable": False, **timing}
        else:
            statuses[i] = {"status": result.status, "reason": result.reason,
                           "retryable": bool(result.retryable), **timing}
    fetch_seconds = max((group.seconds for group in fetched), default=0.0)
    return _write_shard(output_uri, storage_cfg, task, samples, statuses,
                        latency_summary([result for _, result in sorted(results, key=lambda pair: pair[0])]),
                        time.monotonic() - start + fetch_seconds)


def build_shard(
    source: CandidateSource, parts: dict[int, Partition], fetch_cfg: FetchConfig, output_uri: str,
    storage_cfg: StorageConfig | None, task: ShardTask,
) -> dict[str, Any]:
    """Produce one raw shard (images, tar, done-record) in this process; returns the record."""
    if source.needs_fetch:
        items = [(i, e.url) for i, e in enumerate(task.entries) if e.url]
        return write_fetched_shard(source.name, output_uri, storage_cfg, task, fetch_entries(fetch_cfg, items))
    start = time.monotonic()
    statuses: dict[int, dict[str, Any]] = {}
    samples: dict[int, RawSample] = {}
    by_partition: dict[int, list[int]] = {}
    for i, entry in enumerate(task.entries):
        by_partition.setdefault(entry.partition, []).append(i)
    for part_index, indices in by_partition.items():
        try:
            loaded = source.load_images(parts[part_index], [task.entries[i].row for i in indices])
        except OSError as exc:  # a file that vanished or a tar that cannot be read: retryable
            for i in indices:
                statuses[i] = {"status": "failed", "reason": f"read_error: {exc}", "retryable": True}
            continue
        for i in indices:
            entry = task.entries[i]
            cand = loaded.get(entry.row)
            if cand is None or cand.image is None:
                statuses[i] = {"status": "failed", "reason": "missing_image", "retryable": False}
                continue
            try:
                if isinstance(cand.image, bytes):
                    image = process_image(cand.image, fetch_cfg)
                else:
                    image = encode_image(cand.image, fetch_cfg)
            except ImageRejected as exc:
                status = "failed" if exc.reason in ("not_an_image", "truncated") else "filtered"
                statuses[i] = {"status": status, "reason": exc.reason, "retryable": False}
                continue
            samples[i] = RawSample(entry.key, image.jpeg, entry.caption, _sample_meta(entry, source.name, image))
            statuses[i] = {"status": "ok", "reason": None, "retryable": False}
    return _write_shard(output_uri, storage_cfg, task, samples, statuses, None, time.monotonic() - start)


def _write_shard(
    output_uri: str, storage_cfg: StorageConfig | None, task: ShardTask, samples: dict[int, RawSample],
    statuses: dict[int, dict[str, Any]], latency: dict[str, Any] | None, seconds: float,
) -> dict[str, Any]:
    """The tar of the ok samples in entry order, then the done-record listing every entry; returns the record."""
    output = RawOutput(output_uri, storage_cfg)
    ordered = [samples[i] for i in sorted(samples)]
    size = output.write_shard(task.index, ordered)
    record = {
        "version": RECORD_VERSION,
        "shard": raw_shard_name(task.index),
        "fingerprint": task.fingerprint,
        "bytes": size,
        "seconds": seconds,
        "latency": latency,
        "samples": [
            {"candidate": e.candidate, "key": e.key, **statuses[i]} for i, e in enumerate(task.entries)
        ],
    }
    output.write_json(record, RECORDS_DIR, raw_record_name(task.index))  # after the tar: the record means "done"
    return record


def reusable_record(output: RawOutput, task: ShardTask, retry_failed: bool) -> dict[str, Any] | None:
    """The done-record of a shard that need not be built again, else None."""
    if not output.exists(RECORDS_DIR, raw_record_name(task.index)) or not output.exists(raw_shard_name(task.index)):
        return None
    try:
        record = output.read_json(RECORDS_DIR, raw_record_name(task.index))
    except (ValueError, OSError):
        return None
    if record.get("fingerprint") != task.fingerprint:
        return None
    if retry_failed and any(s["status"] == "failed" and s.get("retryable") for s in record["samples"]):
        return None
    return record
