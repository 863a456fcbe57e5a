"""The collection stage: queries -> candidates -> matching and balancing -> raw shards.

    metrics = run_collect(cfg.collect, cfg.compute, cfg.storage)

Steps (each map step runs one task per source partition, on Dask when the pool is large enough):
1. Queries: mined from `collect.queries.corpus_paths`, or else from the candidate captions themselves
   (`from_captions`; thresholds scaled to the pool size) unless the source brings its own vocabulary (the
   synthetic one does); merged with `extra_lists` and that vocabulary; written to `collect.queries_path`.
2. Map: every partition's captions are matched against all queries (n-gram hash lookups) -> per-candidate
   query ids; the texts of matched candidates come back with them.
3. Balance (global, small): each matched candidate gets at most one query, at most `per_query_cap` per query,
   rarest queries first, seeded (clip.collect.matching.balance).
4. Plan: kept candidates in global candidate order get keys 000000000, 000000001, ...; shard = key //
   samples_per_shard. The same pool and config give the same keys and shards on every run.
5. Shards (one task each): fetch (table) or load/render the images, validate and re-encode, write
   raw-NNNNN.tar (temp name, then rename) and its done-record. Shards whose tar and record exist with a
   matching fingerprint are not redone; with `fetch.retry_failed`, shards whose record holds a retryable
   failure are rebuilt whole (all their candidates are tried again; the keys stay the same). On Dask, the
   per-host concurrency and rate limits are shared out among the worker processes (`split_host_limits`).
6. Summaries, always rewritten from the records: candidates.parquet, query_counts.json, stats.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip.collect import queries as query_lib
from clip.collect.images import ImageRejected, encode_image, process_image
from clip.collect.matching import QueryMatcher, balance
from clip.collect.sources import CandidateSource, Partition, make_source
from clip.collect.writer import RawOutput, RawSample, record_name, shard_name
from clip.config import CollectConfig, ComputeConfig, FetchConfig, StorageConfig

RECORD_VERSION = 1
# Below these sizes a local Dask cluster costs more (seconds to start, pickling) than it saves.
_MIN_PARTITIONS_FOR_CLUSTER = 2
_MIN_SHARDS_FOR_CLUSTER = 8


# ----------------------------------------------------------------------------------------------------------
# task functions (top level: Dask pickles them by reference)

_MATCHER_CACHE: dict[str, QueryMatcher] = {}


def _matcher(queries: list[str], digest: str) -> QueryMatcher:
    """One matcher per worker process and query list: building it for 500k queries takes about a second."""
    matcher = _MATCHER_CACHE.get(digest)
    if matcher is None:
        _MATCHER_CACHE.clear()
        matcher = _MATCHER_CACHE[digest] = QueryMatcher(queries)
    return matcher


def count_partition(source: CandidateSource, part: Partition) -> query_lib.NgramCounts:
    """Word / bigram counts of one partition's captions (for mining queries from the pool)."""
    return query_lib.NgramCounts().add_texts(c.caption for c in source.iter_candidates(part))


@dataclass
class PartitionMatches:
    index: int
    num_rows: int
    offsets: np.ndarray  # [num_rows + 1] int64, CSR over rows
    query_ids: np.ndarray  # [total matches] int32
    texts: dict[int, tuple[str, str | None]]  # row -> (caption, url), matched rows only


def match_partition(source: CandidateSource, queries: list[str], digest: str, part: Partition) -> PartitionMatches:
    matcher = _matcher(queries, digest)
    captions: list[str] = []
    urls: list[str | None] = []
    for cand in source.iter_candidates(part):
        captions.append(cand.caption)
        urls.append(cand.url)
    offsets, query_ids = matcher.match_many(captions)
    matched = np.flatnonzero(np.diff(offsets)).tolist()
    texts = {row: (captions[row], urls[row]) for row in matched}
    return PartitionMatches(part.index, len(captions), offsets, query_ids, texts)


@dataclass
class ShardEntry:
    candidate: int  # global candidate id
    partition: int
    row: int
    key: str
    query: str
    caption: str
    url: str | None


@dataclass
class ShardTask:
    index: int
    fingerprint: str
    entries: list[ShardEntry]


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
        from clip.collect.fetch import latency_summary

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
        "shard": shard_name(task.index),
        "fingerprint": task.fingerprint,
        "bytes": size,
        "seconds": time.monotonic() - start,
        "latency": latency,
        "samples": [
            {"candidate": e.candidate, "key": e.key, **statuses[i]} for i, e in enumerate(task.entries)
        ],
    }
    output.write_json(record, "records", record_name(task.index))  # after the tar: the record means "done"
    return record


# ----------------------------------------------------------------------------------------------------------
# executing map steps: in this process, or on Dask


class _Runner(AbstractContextManager):
    """Runs task functions over many argument tuples, in process or on a Dask cluster started on first need."""

    def __init__(self, compute: ComputeConfig, force_dask: bool | None) -> None:
        self.compute = compute
        self.force_dask = force_dask
        self.client: Any = None
        self.cluster: Any = None

    def wants_cluster(self, num_items: int, minimum: int) -> bool:
        if self.force_dask is not None:
            return self.force_dask
        if self.compute.dask_scheduler:
            return True
        return self.compute.dask_workers > 1 and num_items >= minimum

    def _client(self) -> Any:
        if self.client is None:
            from dask.distributed import Client, LocalCluster

            if self.compute.dask_scheduler:
                self.client = Client(self.compute.dask_scheduler)
            else:
                self.cluster = LocalCluster(
                    n_workers=self.compute.dask_workers, threads_per_worker=self.compute.threads_per_worker,
                    processes=True, silence_logs=40,
                    # Scheduler, workers and dashboard on loopback only: a local cluster needs no other interface.
                    host="127.0.0.1", dashboard_address="127.0.0.1:0",
                )
                self.client = Client(self.cluster)
        return self.client

    def worker_processes(self) -> int:
        """How many worker processes the cluster has now (each builds shards with its own Fetcher)."""
        return max(1, len(self._client().nthreads()))

    def run(self, fn: Callable[..., Any], shared: tuple[Any, ...], items: Iterable[tuple[Any, ...]],
            parallel: bool) -> Iterator[Any]:
        """fn(*shared, *item) for every item; results in completion order. `shared` is sent to workers once."""
        items = list(items)
        if not parallel:
            for item in items:
                yield fn(*shared, *item)
            return
        from dask.distributed import as_completed

        client = self._client()
        # hash=False: a fresh key per scatter, so releasing an earlier step's copy cannot drop this one.
        shared_futures = [client.scatter(obj, broadcast=True, hash=False) for obj in shared]
        futures = [client.submit(fn, *shared_futures, *item, pure=False) for item in items]
        try:
            for future in as_completed(futures):
                yield future.result()  # re-raises a task's exception here, with its traceback
        finally:
            client.cancel(futures + shared_futures)

    def __exit__(self, *exc_info: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ----------------------------------------------------------------------------------------------------------
# the stage


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def build_query_list(cfg: CollectConfig, source: CandidateSource, parts: list[Partition], runner: _Runner) -> list[str]:
    qcfg = cfg.queries
    counts: query_lib.NgramCounts | None = None
    thresholds: tuple[int | None, int | None] = (None, None)
    vocabulary = source.vocabulary()
    if qcfg.corpus_paths:
        counts = query_lib.corpus_counts(qcfg.corpus_paths)
    elif qcfg.from_captions and not vocabulary:
        counts = query_lib.NgramCounts()
        parallel = runner.wants_cluster(len(parts), _MIN_PARTITIONS_FOR_CLUSTER)
        for part_counts in runner.run(count_partition, (source,), ((p,) for p in parts), parallel):
            counts.merge(part_counts)
        thresholds = query_lib.scaled_thresholds(qcfg, counts.num_texts)
    extra: list[str] = []
    for path in qcfg.extra_lists:
        extra.extend(query_lib.read_lines(path))
    extra.extend(vocabulary)
    found = query_lib.build_queries(counts, qcfg, extra, min_word_count=thresholds[0], min_bigram_count=thresholds[1])
    if not found:
        raise ValueError(
            "collect.queries: no queries (no corpus_paths, from_captions off or nothing frequent enough, "
            "no extra_lists); nothing could be matched"
        )
    return found


def _shard_fingerprint(cfg: CollectConfig, source_name: str, entries: list[ShardEntry]) -> str:
    fetch = cfg.fetch
    image_settings = [fetch.min_size, fetch.max_aspect_ratio, fetch.max_pixels, fetch.max_side, fetch.jpeg_quality]
    return _digest([RECORD_VERSION, source_name, image_settings,
                    [(e.candidate, e.key, e.query, e.caption, e.url) for e in entries]])


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def run_collect(
    cfg: CollectConfig, compute: ComputeConfig | None = None, storage_cfg: StorageConfig | None = None, *,
    use_dask: bool | None = None, show_progress: bool = True,
) -> dict[str, Any]:
    """Run the whole collection stage; returns the stats (also written to stats.json).

    `use_dask`: None decides by size (a local cluster only for many partitions / shards, or always with
    `compute.dask_scheduler`); True / False force it.
    """
    try:
        return _run_collect(cfg, compute, storage_cfg, use_dask=use_dask, show_progress=show_progress)
    finally:
        close_shared_fetchers()  # in-process shard tasks share this process's fetcher; Dask workers exit with theirs


def _run_collect(
    cfg: CollectConfig, compute: ComputeConfig | None, storage_cfg: StorageConfig | None, *,
    use_dask: bool | None, show_progress: bool,
) -> dict[str, Any]:
    compute = compute or ComputeConfig()
    started = time.monotonic()
    source = make_source(cfg, storage_cfg)
    parts = source.partitions()
    part_by_index = {p.index: p for p in parts}
    output = RawOutput(cfg.output_dir, storage_cfg)
    removed_partials = output.remove_partials()

    with _Runner(compute, use_dask) as runner:
        # 1. queries
        queries = build_query_list(cfg, source, parts, runner)
        query_lib.write_queries(queries, cfg.queries_path, storage_cfg)
        digest = _digest(queries)

        # 2. map: match every partition
        match_start = time.monotonic()
        parallel = runner.wants_cluster(len(parts), _MIN_PARTITIONS_FOR_CLUSTER)
        results = sorted(
            runner.run(match_partition, (source, queries, digest), ((p,) for p in parts), parallel),
            key=lambda r: r.index,
        )
        part_start = np.cumsum([0] + [r.num_rows for r in results])  # global id of each partition's row 0
        num_candidates = int(part_start[-1])
        offset_parts, matches_before = [np.zeros(1, np.int64)], 0
        for result in results:  # per-partition CSR offsets -> one global CSR over all candidates
            offset_parts.append(result.offsets[1:] + matches_before)
            matches_before += int(result.offsets[-1])
        offsets = np.concatenate(offset_parts)
        query_ids = np.concatenate([r.query_ids for r in results]) if results else np.zeros(0, np.int32)
        match_seconds = time.monotonic() - match_start

        # 3. balance
        balanced = balance(offsets, query_ids, len(queries), cfg.per_query_cap, cfg.seed)
        kept = np.flatnonzero(balanced.assigned >= 0)

        # 4. plan shards
        partition_of = np.repeat(np.arange(len(results)), [r.num_rows for r in results])
        entries: list[ShardEntry] = []
        for key_index, candidate in enumerate(kept.tolist()):
            p = int(partition_of[candidate])
            row = candidate - int(part_start[p])
            caption, url = results[p].texts[row]
            entries.append(ShardEntry(candidate, results[p].index, row, f"{key_index:09d}",
                                      queries[int(balanced.assigned[candidate])], caption, url))
        per_shard = cfg.samples_per_shard
        tasks = [
            ShardTask(i, "", entries[start:start + per_shard]) for i, start in enumerate(range(0, len(entries), per_shard))
        ]
        for task in tasks:
            task.fingerprint = _shard_fingerprint(cfg, source.name, task.entries)

        # Shards from an earlier, larger plan would be read as part of this pool: remove them.
        for stale in sorted(i for i in output.existing_shard_indices() if i >= len(tasks)):
            output.delete(shard_name(stale))
            output.delete("records", record_name(stale))

        records: dict[int, dict[str, Any]] = {}
        todo: list[ShardTask] = []
        for task in tasks:
            record = _reusable_record(output, task, cfg.fetch.retry_failed)
            if record is None:
                todo.append(task)
            else:
                records[task.index] = record

        # 5. build shards
        build_start = time.monotonic()
        parallel = runner.wants_cluster(len(todo), _MIN_SHARDS_FOR_CLUSTER)
        shard_items = ((task,) for task in todo)
        fetch_cfg = cfg.fetch
        if parallel and source.needs_fetch:
            fetch_cfg = split_host_limits(cfg.fetch, runner.worker_processes())
        shared = (source, part_by_index, fetch_cfg, cfg.output_dir, storage_cfg)
        built_ok = 0
        with _Progress(show_progress, len(tasks), list(records.values())) as advance:
            for record in runner.run(build_shard, shared, shard_items, parallel):
                index = int(record["shard"][4:9])
                records[index] = record
                built_ok += sum(1 for s in record["samples"] if s["status"] == "ok")
                advance(record)
        build_seconds = time.monotonic() - build_start

    # 6. summaries
    stats = _write_summaries(
        cfg, source, parts, output, queries, balanced, records, tasks, results, part_start,
    )
    stats.update({
        "queries": len(queries),
        "shards": len(tasks),
        "shards_built": len(todo),
        "shards_reused": len(tasks) - len(todo),
        "partials_removed": len(removed_partials),
        "used_dask": bool(runner.client is not None),
        "match_seconds": round(match_seconds, 3),
        "match_captions_per_second": round(num_candidates / match_seconds, 1) if match_seconds > 0 else None,
        "build_seconds": round(build_seconds, 3),
        "build_samples_per_second": round(built_ok / build_seconds, 1) if build_seconds > 0 and todo else None,
        "seconds": round(time.monotonic() - started, 3),
    })
    output.write_json(stats, "stats.json")
    return stats


def _reusable_record(output: RawOutput, task: ShardTask, retry_failed: bool) -> dict[str, Any] | None:
    """The done-record of a shard that need not be built again, else None."""
    if not output.exists("records", record_name(task.index)) or not output.exists(shard_name(task.index)):
        return None
    try:
        record = output.read_json("records", record_name(task.index))
    except (ValueError, OSError):
        return None
    if record.get("fingerprint") != task.fingerprint:
        return None
    if retry_failed and any(s["status"] == "failed" and s.get("retryable") for s in record["samples"]):
        return None
    return record


class _Progress:
    """A Rich progress bar over shards (done / total, samples ok / not ok); a no-op when disabled.

    `reused`: the records of shards kept from an earlier run; they count as done, and so do their samples, so a
    resumed run ends on the pool's totals rather than on only what this run built.
    """

    def __init__(self, enabled: bool, total: int, reused: list[dict[str, Any]]) -> None:
        self.enabled, self.total, self.already = enabled, total, len(reused)
        self.ok = sum(1 for r in reused for s in r["samples"] if s["status"] == "ok")
        self.bad = sum(1 for r in reused for s in r["samples"]) - self.ok

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not self.enabled:
            return lambda record: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("collect: shards"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)
        self.bar.start()
        start = f"samples ok {self.ok}, not ok {self.bad}" if self.already else ""
        self.task = self.bar.add_task(start, total=self.total, completed=self.already)

        def advance(record: dict[str, Any]) -> None:
            for sample in record["samples"]:
                if sample["status"] == "ok":
                    self.ok += 1
                else:
                    self.bad += 1
            self.bar.update(self.task, advance=1, description=f"samples ok {self.ok}, not ok {self.bad}")

        return advance

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self.bar.stop()


def _write_summaries(
    cfg: CollectConfig, source: CandidateSource, parts: list[Partition], output: RawOutput, queries: list[str],
    balanced: Any, records: dict[int, dict[str, Any]], tasks: list[ShardTask], results: list[PartitionMatches],
    part_start: np.ndarray,
) -> dict[str, Any]:
    """candidates.parquet (streamed, one partition at a time), query_counts.json; returns the stats.

    candidates.parquet: kept candidates carry key, shard, their assigned query and the status from their
    shard's record; skipped ones have no key: `query_full` names their rarest matching query, `no_query` none.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_candidate: dict[int, tuple[dict[str, Any], int]] = {}
    for index, record in records.items():
        for sample in record["samples"]:
            by_candidate[sample["candidate"]] = (sample, index)
    status_counts: Counter = Counter()
    reason_counts: Counter = Counter()
    ok_per_query: Counter = Counter()
    schema = pa.schema([
        ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("query", pa.string()),
        ("status", pa.string()), ("reason", pa.string()), ("shard", pa.string()),
    ])
    assigned = balanced.assigned
    query_order = np.empty(len(queries), np.int64)  # rarest-first rank, for naming a full query
    query_order[np.lexsort((np.arange(len(queries)), balanced.match_counts))] = np.arange(len(queries))
    entry_query = {e.candidate: e.query for t in tasks for e in t.entries}

    local_tmp = output.temp_path("candidates.parquet")
    with pq.ParquetWriter(local_tmp, schema) as writer:
        for p, result in enumerate(results):
            columns: dict[str, list[Any]] = {name: [] for name in schema.names}
            base = int(part_start[p])
            offsets, qids = result.offsets, result.query_ids
            for row, cand in enumerate(source.iter_candidates(parts[p])):
                candidate = base + row
                key = query = reason = shard = None
                if assigned[candidate] >= 0:
                    sample, shard_index = by_candidate[candidate]
                    key, status, reason = sample["key"], sample["status"], sample["reason"]
                    query, shard = entry_query[candidate], shard_name(shard_index)
                    if status == "ok":
                        ok_per_query[query] += 1
                else:
                    status = "skipped"
                    matched = qids[offsets[row]:offsets[row + 1]]
                    if len(matched):
                        reason = "query_full"
                        query = queries[int(matched[np.argmin(query_order[matched])])]
                    else:
                        reason = "no_query"
                status_counts[status] += 1
                if reason:
                    reason_counts[reason] += 1
                for name, value in zip(schema.names, (key, cand.url, cand.caption, query, status, reason, shard),
                                       strict=True):
                    columns[name].append(value)
            writer.write_table(pa.table(columns, schema=schema))
    output.publish(local_tmp, "candidates.parquet")

    counts = {
        queries[q]: {"matched": int(balanced.match_counts[q]), "assigned": int(balanced.assigned_counts[q]),
                     "ok": int(ok_per_query.get(queries[q], 0))}
        for q in np.flatnonzero(balanced.match_counts).tolist()
    }
    output.write_json({"per_query_cap": cfg.per_query_cap, "num_queries": len(queries), "counts": counts},
                      "query_counts.json")

    stats: dict[str, Any] = {
        "source": source.name,
        "candidates": int(part_start[-1]),
        "matched": sum(int(np.count_nonzero(np.diff(r.offsets))) for r in results),
        "assigned": int(np.count_nonzero(assigned >= 0)),
        "by_status": {s: status_counts.get(s, 0) for s in ("ok", "failed", "filtered", "skipped")},
        "by_reason": dict(sorted(reason_counts.items())),
        "queries_with_matches": len(counts),
    }
    if source.needs_fetch:
        dns = [s["dns_ms"] for r in records.values() for s in r["samples"] if s.get("dns_ms") is not None]
        download = [s["download_ms"] for r in records.values() for s in r["samples"]
                    if s.get("download_ms") is not None]
        stats["fetch_latency_ms"] = {
            "dns_median": _percentile(dns, 50), "dns_p99": _percentile(dns, 99),
            "download_median": _percentile(download, 50), "download_p99": _percentile(download, 99),
            "dns_samples": len(dns), "download_samples": len(download),
        }
        stats["fetch_latency_ms_per_shard"] = {
            r["shard"]: r["latency"] for _, r in sorted(records.items()) if r.get("latency")
        }
    return stats

