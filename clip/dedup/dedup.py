"""Dedup of the raw pool: evaluation overlap, exact duplicates, near duplicates -> keep / removed tables.

Order of the passes (each sees only what the previous ones kept):
1. `eval_overlap`: images within the pHash threshold of an evaluation image (checked over the whole pool, so the
   overlap report counts every contaminated pair);
2. `exact_caption_image`: same normalised caption and same image bytes (when `exact_caption_image`);
3. `exact_sha256`: same image bytes under a different caption;
4. `near_duplicate`: pHash Hamming distance <= `near_dup_threshold`, clustered transitively (when
   `near_duplicates`).
pHash matches (passes 1 and 4) are confirmed by a colour check when `color_tolerance` is set (clip.dedup.color):
pHash is grey-level, so without it same-layout images in different colours would be merged. The colour signatures
come from the raw JSON; only a pool written before they were stored has images decoded, counted in the metric
`images_decoded_for_color_check`.
The near-duplicate pass uses the bounded search (clip.dedup.neardup.find_near_duplicates: work per sample bounded
whatever the clusters; its counters are in the metric `near_duplicate_search`). The passes work on the pool's
numpy columns (clip.dedup.pool) and vectorised group operations; Python lists are built only for the result.
In every duplicate group the survivor is deterministic: the largest image (width * height), then the smallest key;
`duplicate_of` names it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clip.compute import DaskRunner
from clip.config import ComputeConfig, DedupConfig, StorageConfig
from clip.dedup.color import PoolColors
from clip.dedup.decontam import (
    EvalSet,
    eval_set_names,
    find_overlap,
    hash_image_folder,
    hash_registry_dataset,
    registry_keys,
    synthetic_eval_sets,
)
from clip.dedup.neardup import NearDuplicates, color_distance, find_near_duplicates, find_near_duplicates_dask
from clip.dedup.pool import PoolMetadata, normalize_caption
from clip.formats.dedup import write_keep_list, write_overlap_report, write_removed_list
from clip.progress import Progress, for_task
from clip.result import StageResult

REASONS = ("eval_overlap", "exact_caption_image", "exact_sha256", "near_duplicate")
_KEPT = -1  # reason code of a kept sample; otherwise the index into REASONS
# Fewest live samples for which the near-duplicate search goes to a local Dask cluster (`DaskRunner.wants_cluster`;
# a configured scheduler takes every pool). Below it the in-process search takes under ~35 CPU-seconds, and shipping
# the hashes to local workers costs more than it saves (BENCHMARKS.md: 1M hashes, 3.4 s in process, 35-48 s as
# tasks on 2 local workers).
MIN_SAMPLES_FOR_CLUSTER = 10_000_000

__all__ = ["REASONS", "DedupResult", "deduplicate", "load_eval_sets", "normalize_caption", "write_outputs"]


@dataclass(kw_only=True)
class DedupResult(StageResult):
    """The dedup tables, one entry per pool sample in pool order, plus metrics (and, from `stage.run`, outputs)."""

    keys: list[str]
    shards: list[str]
    sha256: list[str]  # image sha256 from each sample's raw JSON (keep.parquet carries it, the shard stage checks it)
    caption_digest: list[str]  # clip.formats.raw.caption_digest of each caption (checked the same way)
    reason: list[str | None]  # None: kept
    duplicate_of: list[str | None]
    overlap_report: dict[str, dict[str, Any]]

    def kept_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.reason) if r is None]


def _as_rows(columns: list[np.ndarray]) -> np.ndarray:
    """[k] opaque byte strings, one per row of the [k, w_i] uint8 columns side by side: equal rows, equal values."""
    table = np.ascontiguousarray(np.concatenate([c.reshape(c.shape[0], -1).view(np.uint8) for c in columns], axis=1))
    return table.view(np.dtype((np.void, table.shape[1]))).reshape(-1)


def _remove_groups(pool: PoolMetadata, alive: np.ndarray, group_of: np.ndarray, reason_code: int,
                   reason: np.ndarray, duplicate_of: np.ndarray) -> int:
    """Within each group of alive indices keep the survivor, mark the rest; returns how many were removed.

    alive: [k] pool indices; group_of: [k] group value of each (any sortable dtype). The survivor of a group is
    the largest image (width * height), then the smallest key. reason / duplicate_of: [n] codes and survivor
    pool index, written for the removed.
    """
    if alive.size < 2:
        return 0
    _, group = np.unique(group_of, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((pool.keys[alive], -pool.area[alive], group))  # by group, then the survivor first
    sorted_group = group[order]
    first = np.concatenate(([True], sorted_group[1:] != sorted_group[:-1]))
    survivor = alive[order[first]][np.cumsum(first) - 1]  # [k] the survivor of each sorted member's group
    removed = alive[order[~first]]
    reason[removed] = reason_code
    duplicate_of[removed] = survivor[~first]
    return int(removed.size)


def _near_duplicates(hashes: np.ndarray, cfg: DedupConfig, runner: DaskRunner, on_cluster: bool, dask: Any,
                     progress: Progress | None, colors: np.ndarray | None,
                     color_rows: np.ndarray) -> NearDuplicates:
    """The bounded search over `hashes`, in this process or (`on_cluster`) as Dask tasks on `dask` when given,
    else on the runner's cluster (started on first need)."""
    tolerance = None if colors is None else cfg.color_tolerance
    rows = None if colors is None else color_rows
    if not on_cluster:
        return find_near_duplicates(hashes, cfg.near_dup_threshold, colors, tolerance,
                                    progress=for_task(progress, "near-duplicate bands"), color_rows=rows)
    compute = runner.compute
    partitions = max(1, compute.dask_workers * compute.threads_per_worker * 2)
    client = dask if dask is not None else runner.client_or_start()
    return find_near_duplicates_dask(hashes, cfg.near_dup_threshold, client, partitions, colors, tolerance, rows)


def load_eval_sets(cfg: DedupConfig, synthetic_image_size: int, progress: Progress | None = None) -> list[EvalSet]:
    """The evaluation sets to decontaminate against: `cfg.eval_dirs`, then the synthetic sets (when enabled),
    rendered at `synthetic_image_size` like the pool's synthetic scenes."""
    sets = []
    for folder, name in zip(cfg.eval_dirs, eval_set_names(cfg.eval_dirs), strict=True):
        sets.append(hash_image_folder(folder, name, for_task(progress, f"hashing eval set {name}")))
    for key in registry_keys(cfg.eval_datasets or []):
        found = hash_registry_dataset(key, cfg.eval_root or ".", for_task(progress, f"hashing eval set {key}"))
        if found is not None:
            sets.append(found)
    if cfg.decontaminate_synthetic:
        sets.extend(synthetic_eval_sets(synthetic_image_size))
    return sets


def deduplicate(pool: PoolMetadata, cfg: DedupConfig, eval_sets: list[EvalSet],
                compute: ComputeConfig | None = None, dask: Any = None,
                progress: Progress | None = None, storage_cfg: StorageConfig | None = None) -> DedupResult:
    """Run the four passes over `pool`. The near-duplicate search runs on a Dask cluster when the compute
    section's runner wants one for this many samples (`DaskRunner.wants_cluster`, as collect decides; `cfg.use_dask`
    true / false forces it): on `dask`, an existing client, when given, else on one the runner starts."""
    start = time.monotonic()
    colors = PoolColors(pool, storage_cfg)
    tolerance = cfg.color_tolerance

    def confirm_eval(train_idx: np.ndarray, eval_signatures: np.ndarray) -> np.ndarray:
        assert tolerance is not None
        return color_distance(colors.get(train_idx), eval_signatures) <= tolerance

    n = len(pool)
    reason = np.full(n, _KEPT, dtype=np.int8)  # [n] index into REASONS, _KEPT when kept
    duplicate_of = np.full(n, -1, dtype=np.int64)  # [n] pool index of the survivor (near and exact passes)
    hashes = pool.phash
    counts = dict.fromkeys(REASONS, 0)
    timings: dict[str, float] = {}

    tick = time.monotonic()
    overlap = find_overlap(hashes, pool.keys, eval_sets, cfg.near_dup_threshold, cfg.report_examples,
                           confirm=None if tolerance is None else confirm_eval)
    eval_match: dict[int, str] = {}
    for idx, (match, _distance) in overlap.removed.items():
        reason[idx] = REASONS.index("eval_overlap")
        eval_match[idx] = match
    counts["eval_overlap"] = len(overlap.removed)
    timings["eval_overlap_s"] = time.monotonic() - tick

    def alive() -> np.ndarray:
        return np.flatnonzero(reason == _KEPT)

    tick = time.monotonic()
    if cfg.exact_caption_image:
        live = alive()
        counts["exact_caption_image"] = _remove_groups(
            pool, live, _as_rows([pool.caption[live], pool.sha256[live]]), REASONS.index("exact_caption_image"),
            reason, duplicate_of)
    live = alive()
    counts["exact_sha256"] = _remove_groups(pool, live, _as_rows([pool.sha256[live]]), REASONS.index("exact_sha256"),
                                            reason, duplicate_of)
    timings["exact_s"] = time.monotonic() - tick

    tick = time.monotonic()
    near_pairs = color_rejected = 0
    search_stats: dict[str, Any] = {}
    on_cluster = False
    if cfg.near_duplicates:
        live = alive()
        with DaskRunner(compute or ComputeConfig(), force_dask=cfg.use_dask) as runner:
            on_cluster = runner.wants_cluster(live.size, MIN_SAMPLES_FOR_CLUSTER)
            found = _near_duplicates(hashes[live], cfg, runner, on_cluster, dask, progress,
                                     None if tolerance is None else pool.color, live)
            while tolerance is not None:
                # A pool written before the colour field holds zeros for the missing signatures: decode the
                # samples whose pHash matches were checked on one, and search again, until every check used a
                # real one.
                checked = live[np.unique(np.concatenate([found.edges, found.rejected]))]
                missing = checked[~pool.has_color[checked]]
                if missing.size == 0:
                    break
                colors.ensure(missing)
                found = _near_duplicates(hashes[live], cfg, runner, on_cluster, dask, progress, pool.color, live)
        near_pairs, color_rejected = int(found.edges.shape[0]), found.color_rejected
        search_stats = {**asdict(found.stats), "bound_per_sample": found.stats.bound_per_hash}
        counts["near_duplicate"] = _remove_groups(pool, live, found.labels(live.size),
                                                  REASONS.index("near_duplicate"), reason, duplicate_of)
    timings["near_duplicate_s"] = time.monotonic() - tick

    kept = int(np.count_nonzero(reason == _KEPT))
    metrics: dict[str, Any] = {
        "input_samples": n,
        "incomplete_samples": pool.incomplete,
        "raw_shards": pool.raw_shards,
        "kept": kept,
        "removed": n - kept,
        "removed_by_reason": counts,
        "near_duplicate_pairs": near_pairs,
        "near_duplicate_pairs_color_rejected": color_rejected,
        "near_duplicate_search": search_stats,
        "eval_matches_color_rejected": {name: r["color_rejected"] for name, r in overlap.report.items()},
        "color_tolerance": tolerance,
        "images_decoded_for_color_check": colors.decoded,
        "pool_bytes_per_sample": round(pool.bytes_per_sample(), 1),
        "near_dup_threshold": cfg.near_dup_threshold,
        "eval_sets": {s.name: s.num_images for s in eval_sets},
        "eval_overlap_by_set": {name: r["matched"] for name, r in overlap.report.items()},
        "use_dask": on_cluster,  # whether the near-duplicate search ran on a Dask cluster
        **timings,
        "dedup_seconds": time.monotonic() - start,
    }
    keys = pool.key_list()
    reason_text: list[str | None] = [None if r == _KEPT else REASONS[r] for r in reason.tolist()]
    survivor: list[str | None] = [None if d < 0 else keys[d] for d in duplicate_of.tolist()]
    for idx, match in eval_match.items():
        survivor[idx] = match
    return DedupResult(keys=keys, shards=pool.shard_list(), sha256=pool.sha256_hex(),
                       caption_digest=pool.caption_digest_hex(), reason=reason_text,
                       duplicate_of=survivor, overlap_report=overlap.report, metrics=metrics)


def write_outputs(result: DedupResult, output_dir: str, storage_cfg: StorageConfig | None = None) -> dict[str, str]:
    """keep.parquet, removed.parquet, overlap_report.json under `output_dir` (clip.formats.dedup; each atomic)."""
    kept = result.kept_indices()
    # sha256 and the caption digest tie the keep-list to the raw pool it was computed from: keys are positional and
    # a collect rerun reuses them for other pairs, so the shard stage refuses a keep-list the raw JSON contradicts.
    keep_uri = write_keep_list(output_dir, [result.keys[i] for i in kept], [result.shards[i] for i in kept],
                               [result.sha256[i] for i in kept], [result.caption_digest[i] for i in kept], storage_cfg)
    removed = [i for i, r in enumerate(result.reason) if r is not None]
    removed_uri = write_removed_list(output_dir, [result.keys[i] for i in removed],
                                     [result.reason[i] for i in removed], [result.duplicate_of[i] for i in removed],
                                     [result.shards[i] for i in removed], storage_cfg)
    report_uri = write_overlap_report(output_dir, result.overlap_report, storage_cfg)
    return {"keep": keep_uri, "removed": removed_uri, "overlap_report": report_uri}
