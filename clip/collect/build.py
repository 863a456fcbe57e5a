"""Building one raw shard from its planned candidates: images fetched or loaded, validated, written with a record.

`build_shard` is the shard task of the collect stage (top level: Dask pickles it by reference). It writes
`raw-NNNNN.tar` through `RawOutput` (temporary name, then rename) and then the shard's done-record, so a
record on disk means its tar is complete. The record lists every planned candidate with its status, and a
fingerprint of everything that decided the shard's bytes (`shard_fingerprint`): a rerun reuses a shard only
when the fingerprint still matches.

Fetchers are shared per process (`shared_fetcher`): their DNS cache, connection pools and per-host limits then
span every shard that process builds; `split_host_limits` shares the per-host limits out among processes.
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
from clip.collect.sources import CandidateSource, Partition
from clip.collect.writer import RawOutput
from clip.config import CollectConfig, FetchConfig, StorageConfig
from clip.formats.raw import RECORDS_DIR, RawSample, raw_record_name, raw_shard_name

RECORD_VERSION = 1


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


def split_host_limits(fetch_cfg: FetchConfig, processes: int) -> FetchConfig:
    """The fetch config for each of `processes` worker processes building shards at once.

    The per-host limits live in a Fetcher, i.e. per process; shared out among the processes, they hold for
    the whole run (floor of one connection per process: with more processes than allowed connections, at most
    one per process).
    """
    if processes <= 1:
        return fetch_cfg
    return fetch_cfg.model_copy(update={
        "per_host_concurrency": max(1, fetch_cfg.per_host_concurrency // processes),
        "per_host_rate": fetch_cfg.per_host_rate / processes,
    })


def close_shared_fetchers() -> None:
    """Close this process's shared fetchers (their connection pools and resolver threads)."""
    with _SHARED_FETCHERS_LOCK:
        for fetcher in _SHARED_FETCHERS.values():
            fetcher.close()
        _SHARED_FETCHERS.clear()


def build_shard(
    source: CandidateSource, parts: dict[int, Partition], fetch_cfg: FetchConfig, output_uri: str,
    storage_cfg: StorageConfig | None, task: ShardTask,
) -> dict[str, Any]:
    """Produce one raw shard (images, tar, done-record); returns the record."""
    start = time.monotonic()
    statuses: dict[int, dict[str, Any]] = {}
    samples: dict[int, RawSample] = {}
    latency: dict[str, Any] | None = None

    def ok(i: int, entry: ShardEntry, image: Any, **extra: Any) -> None:
        samples[i] = RawSample(entry.key, image.jpeg, entry.caption, _sample_meta(entry, source.name, image))
        statuses[i] = {"status": "ok", "reason": None, "retryable": False, **extra}

    if source.needs_fetch:
        from clip.collect.net.latency import latency_summary

        with_url = [i for i, e in enumerate(task.entries) if e.url]
        for i, entry in enumerate(task.entries):
            if not entry.url:
                statuses[i] = {"status": "failed", "reason": "missing_url", "retryable": False}
        fetcher = shared_fetcher(fetch_cfg)
        shard_results = []
        for j, result in fetcher.fetch_many([task.entries[i].url for i in with_url]):
            shard_results.append(result)
            i = with_url[j]
            timing = {"dns_ms": result.dns_ms, "download_ms": result.download_ms}
            if result.status == "ok" and result.image is not None:
                ok(i, task.entries[i], result.image, **timing)
            else:
                statuses[i] = {"status": result.status, "reason": result.reason,
                               "retryable": bool(result.retryable), **timing}
        latency = latency_summary(shard_results)
    else:
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
                ok(i, entry, image)

    output = RawOutput(output_uri, storage_cfg)
    ordered = [samples[i] for i in sorted(samples)]
    size = output.write_shard(task.index, ordered)
    record = {
        "version": RECORD_VERSION,
        "shard": raw_shard_name(task.index),
        "fingerprint": task.fingerprint,
        "bytes": size,
        "seconds": time.monotonic() - start,
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
