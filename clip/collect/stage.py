"""The collection stage: queries -> candidates -> matching and balancing -> raw shards.

    from clip.collect import stage
    result = stage.run(cfg.collect, storage=cfg.storage, compute=cfg.compute, progress=progress)
    result.stats["by_status"]    # {"ok": ..., "failed": ..., "filtered": ..., "skipped": ...}

Steps (each map step runs one task per source partition, on Dask when the pool is large enough):
1. Queries: mined from `collect.queries.corpus_paths`, or else from the candidate captions themselves
   (`from_captions`; thresholds scaled to the pool size) unless the source brings its own vocabulary (the
   synthetic one does); merged with `extra_lists` and that vocabulary; written to `collect.queries_path`.
2. Map: every partition's captions are matched against all queries (n-gram hash lookups) -> per-candidate
   query ids; the texts of matched candidates come back with them (clip.collect.partitions).
3. Balance (global, small): each matched candidate gets at most one query, at most `per_query_cap` per query,
   rarest queries first, seeded (clip.collect.matching.balance).
4. Plan: kept candidates in global candidate order get keys 000000000, 000000001, ...; shard = key //
   samples_per_shard. The same pool and config give the same keys and shards on every run.
5. Shards (one task each, clip.collect.build): fetch (table) or load/render the images, validate and re-encode,
   write raw-NNNNN.tar (through clip.storage: visible only once complete) and its done-record. Shards whose
   tar and record exist with a matching fingerprint are not redone; with `fetch.retry_failed`, shards whose
   record holds a retryable failure are rebuilt whole (all their candidates are tried again; the keys stay the
   same). On Dask, a URL source's fetches run in the worker process that owns the URL's host
   (`build_host_owned`), so the per-host concurrency and rate limits hold as configured across all workers; only
   the writing of a shard may run anywhere.
6. Summaries, always rewritten from the records (clip.collect.summary): candidates.parquet, query_counts.json,
   stats.json. stats.json also records `collect.synthetic.image_size` for dedup (docs/formats.md).

Progress: one task, "collect: shards" (done / total shards, detail "samples ok N, not ok M"); shards reused
from an earlier run count as done from the start, so a resumed run ends on the pool's totals.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from clip import storage as storage_lib
from clip.collect import queries as query_lib
from clip.collect.build import (
    ShardEntry,
    ShardTask,
    build_shard,
    close_shared_fetchers,
    digest,
    fetch_entries,
    reusable_record,
    shard_fingerprint,
    split_by_owner,
    write_fetched_shard,
)
from clip.collect.matching import balance
from clip.collect.partitions import count_partition, match_partition
from clip.collect.sources import CandidateSource, Partition, make_source
from clip.collect.summary import stage_metrics, write_summaries
from clip.collect.writer import RawOutput
from clip.compute import DaskRunner
from clip.config import CollectConfig, ComputeConfig, FetchConfig, StorageConfig, TrackingConfig
from clip.formats.candidates import candidates_uri
from clip.formats.raw import (
    QUERY_COUNTS_NAME,
    RECORDS_DIR,
    STATS_NAME,
    SYNTHETIC_IMAGE_SIZE_FIELD,
    raw_record_name,
    raw_shard_index,
    raw_shard_name,
)
from clip.progress import Progress
from clip.result import StageResult

PROGRESS_TASK = "collect: shards"
# Below these sizes a local Dask cluster costs more (seconds to start, pickling) than it saves. Module-level so
# that a test can lower them to put a small pool on Dask.
MIN_PARTITIONS_FOR_CLUSTER = 2
MIN_SHARDS_FOR_CLUSTER = 8


@dataclass(kw_only=True)
class CollectResult(StageResult):
    """metrics: the flat `collect_*` figures; outputs: raw shard folder, queries, summaries; stats: stats.json."""

    stats: dict[str, Any] = field(default_factory=dict)  # what stats.json holds (nested: by_status, latency, ...)


def run(
    cfg: CollectConfig, *, storage: StorageConfig, compute: ComputeConfig, tracking: TrackingConfig | None = None,
    progress: Progress | None = None,
) -> CollectResult:
    """Run the whole collection stage into `cfg.output_dir`; stats.json holds the returned `stats`.

    A cluster is used for a map step when `compute` names a Dask scheduler, or when it has more than one local
    worker and the step has at least MIN_PARTITIONS_FOR_CLUSTER partitions / MIN_SHARDS_FOR_CLUSTER shards.
    `tracking` is accepted for the common stage shape; collect logs nothing to MLflow.
    """
    try:
        stats = _collect(cfg, storage, compute, progress)
    finally:
        close_shared_fetchers()  # in-process shard tasks share this process's fetcher; Dask workers exit with theirs
    outputs = {
        "raw": cfg.output_dir,
        "queries": cfg.queries_path,
        "candidates": candidates_uri(cfg.output_dir),
        "query_counts": storage_lib.join(cfg.output_dir, QUERY_COUNTS_NAME),
        "stats": storage_lib.join(cfg.output_dir, STATS_NAME),
    }
    return CollectResult(metrics=stage_metrics(stats), outputs=outputs, stats=stats)


def build_query_list(cfg: CollectConfig, source: CandidateSource, parts: list[Partition], runner: DaskRunner) -> list[str]:
    """Step 1: the query list (mined counts, extra lists and the source's own vocabulary), never empty."""
    qcfg = cfg.queries
    counts: query_lib.NgramCounts | None = None
    thresholds: tuple[int | None, int | None] = (None, None)
    vocabulary = source.vocabulary()
    if qcfg.corpus_paths:
        counts = query_lib.corpus_counts(qcfg.corpus_paths)
    elif qcfg.from_captions and not vocabulary:
        counts = query_lib.NgramCounts()
        parallel = runner.wants_cluster(len(parts), MIN_PARTITIONS_FOR_CLUSTER)
        for part_counts in runner.run(count_partition, (source, cfg.max_caption_bytes), ((p,) for p in parts),
                                      parallel):
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


class _ShardProgress:
    """Reports "collect: shards" to the progress protocol, with the running sample counts as detail.

    `reused`: the records of shards kept from an earlier run; they count as done, and so do their samples.
    """

    def __init__(self, progress: Progress | None, total: int, reused: list[dict[str, Any]]) -> None:
        self.progress, self.total, self.done = progress, total, len(reused)
        self.ok = sum(1 for r in reused for s in r["samples"] if s["status"] == "ok")
        self.bad = sum(len(r["samples"]) for r in reused) - self.ok
        if progress is not None:
            progress(PROGRESS_TASK, self.done, total, self.detail() if reused else "")

    def detail(self) -> str:
        return f"samples ok {self.ok}, not ok {self.bad}"

    def shard_built(self, record: dict[str, Any]) -> None:
        ok = sum(1 for s in record["samples"] if s["status"] == "ok")
        self.ok += ok
        self.bad += len(record["samples"]) - ok
        self.done += 1
        if self.progress is not None:
            self.progress(PROGRESS_TASK, self.done, self.total, self.detail())


def build_host_owned(
    runner: DaskRunner, source_name: str, fetch_cfg: FetchConfig, output_uri: str,
    storage_cfg: StorageConfig | None, tasks: list[ShardTask],
) -> Iterator[dict[str, Any]]:
    """Build a URL source's shards on the Dask cluster with every host fetched by one worker process.

    Worker i of the sorted worker addresses owns the hosts `host_owner(url, workers) == i`; each shard's URLs
    are fetched by one `fetch_entries` task per owner, pinned to that worker (strict restrictions: work
    stealing never moves one), and written by a `write_fetched_shard` task that may run anywhere. At most two
    shards per worker are in flight, so fetched images held between the two steps stay bounded. Yields the
    records in completion order. The owners are fixed when the step starts: a worker lost mid-run leaves its
    hosts' fetches waiting (the run does not finish; a rerun resumes from the finished shards).
    """
    from dask.distributed import as_completed

    client = runner.client_or_start()
    client.wait_for_workers(1)  # a scheduler named in the config may have none yet
    workers = sorted(client.nthreads())  # addresses; the owner of a host is its index here
    # hash=False: a fresh key, so no other step's release can drop it.
    shared_cfg = client.scatter(fetch_cfg, broadcast=True, hash=False)
    submitted = []

    def submit(task: ShardTask) -> Any:
        fetches = [
            client.submit(fetch_entries, shared_cfg, items, workers=[workers[owner]], allow_other_workers=False,
                          pure=False)
            for owner, items in sorted(split_by_owner(task, len(workers)).items())
        ]
        written = client.submit(write_fetched_shard, source_name, output_uri, storage_cfg, task, *fetches,
                                pure=False)
        submitted.append(written)
        return written

    waiting = iter(tasks)
    running = as_completed([submit(task) for task in islice(waiting, 2 * len(workers))])
    try:
        for future in running:
            record = future.result()  # re-raises a task's exception here, with its traceback
            following = next(waiting, None)
            if following is not None:
                running.add(submit(following))
            submitted.remove(future)
            yield record
    finally:
        client.cancel([*submitted, shared_cfg])


def _collect(
    cfg: CollectConfig, storage_cfg: StorageConfig, compute: ComputeConfig, progress: Progress | None,
) -> dict[str, Any]:
    """Steps 1-6; returns the stats (also written to stats.json)."""
    started = time.monotonic()
    source = make_source(cfg, storage_cfg)
    parts = source.partitions()
    part_by_index = {p.index: p for p in parts}
    output = RawOutput(cfg.output_dir, storage_cfg)
    removed_partials = output.remove_partials()

    with DaskRunner(compute) as runner:
        # 1. queries
        queries = build_query_list(cfg, source, parts, runner)
        query_lib.write_queries(queries, cfg.queries_path, storage_cfg)
        query_digest = digest(queries)

        # 2. map: match every partition
        match_start = time.monotonic()
        parallel = runner.wants_cluster(len(parts), MIN_PARTITIONS_FOR_CLUSTER)
        results = sorted(
            runner.run(match_partition, (source, queries, query_digest, cfg.max_caption_bytes),
                       ((p,) for p in parts), parallel),
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
            task.fingerprint = shard_fingerprint(cfg, source.name, task.entries)

        # Shards from an earlier, larger plan would be read as part of this pool: remove them.
        for stale in sorted(i for i in output.existing_shard_indices() if i >= len(tasks)):
            output.delete(raw_shard_name(stale))
            output.delete(RECORDS_DIR, raw_record_name(stale))

        records: dict[int, dict[str, Any]] = {}
        todo: list[ShardTask] = []
        for task in tasks:
            record = reusable_record(output, task, cfg.fetch.retry_failed)
            if record is None:
                todo.append(task)
            else:
                records[task.index] = record

        # 5. build shards
        build_start = time.monotonic()
        parallel = runner.wants_cluster(len(todo), MIN_SHARDS_FOR_CLUSTER)
        if parallel and source.needs_fetch:
            built = build_host_owned(runner, source.name, cfg.fetch, cfg.output_dir, storage_cfg, todo)
        else:
            shared = (source, part_by_index, cfg.fetch, cfg.output_dir, storage_cfg)
            built = runner.run(build_shard, shared, ((task,) for task in todo), parallel)
        built_ok = 0
        shard_progress = _ShardProgress(progress, len(tasks), list(records.values()))
        for record in built:
            index = raw_shard_index(record["shard"])
            if index is None:
                raise RuntimeError(f"a built shard's record names {record['shard']!r}, not a raw shard")
            records[index] = record
            built_ok += sum(1 for s in record["samples"] if s["status"] == "ok")
            shard_progress.shard_built(record)
        build_seconds = time.monotonic() - build_start
        used_dask = runner.client is not None

    # 6. summaries
    stats = write_summaries(cfg, source, parts, output, queries, balanced, records, tasks, results, part_start)
    stats.update({
        "queries": len(queries),
        "shards": len(tasks),
        "shards_built": len(todo),
        "shards_reused": len(tasks) - len(todo),
        "partials_removed": len(removed_partials),
        "used_dask": used_dask,
        "match_seconds": round(match_seconds, 3),
        "match_captions_per_second": round(num_candidates / match_seconds, 1) if match_seconds > 0 else None,
        "build_seconds": round(build_seconds, 3),
        "build_samples_per_second": round(built_ok / build_seconds, 1) if build_seconds > 0 and todo else None,
        "seconds": round(time.monotonic() - started, 3),
        # Dedup renders the synthetic evaluation sets at this size; it reads it from here, not from collect's config.
        SYNTHETIC_IMAGE_SIZE_FIELD: cfg.synthetic.image_size,
    })
    output.write_json(stats, STATS_NAME)
    return stats
