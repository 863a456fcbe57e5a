"""Dedup of the raw pool: evaluation overlap, exact duplicates, near duplicates -> keep / removed tables.

Order of the passes (each sees only what the previous ones kept):
1. `eval_overlap`: images within the pHash threshold of an evaluation image (checked over the whole pool, so the
   overlap report counts every contaminated pair);
2. `exact_caption_image`: same normalised caption and same image bytes (when `exact_caption_image`);
3. `exact_sha256`: same image bytes under a different caption;
4. `near_duplicate`: pHash Hamming distance <= `near_dup_threshold`, clustered transitively (when
   `near_duplicates`).
pHash matches (passes 1 and 4) are confirmed by a colour check when `color_tolerance` is set (clip.dedup.color):
pHash is grey-level, so without it same-layout images in different colours would be merged.
In every duplicate group the survivor is deterministic: the largest image (width * height), then the smallest key;
`duplicate_of` names it.
"""

from __future__ import annotations

import string
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip.compute import DaskRunner
from clip.config import ComputeConfig, DedupConfig, StorageConfig
from clip.dedup.color import PoolSignatures, signature_distance
from clip.dedup.decontam import (
    EvalSet,
    eval_set_names,
    find_overlap,
    hash_image_folder,
    hash_registry_dataset,
    registry_keys,
    synthetic_eval_sets,
)
from clip.dedup.neardup import cluster_labels, find_near_pairs, find_near_pairs_dask
from clip.dedup.pool import PoolMetadata
from clip.formats.dedup import write_keep_list, write_overlap_report, write_removed_list
from clip.progress import Progress, for_task
from clip.result import StageResult

REASONS = ("eval_overlap", "exact_caption_image", "exact_sha256", "near_duplicate")


def normalize_caption(caption: str) -> str:
    """Lower-case, whitespace collapsed, punctuation stripped at both ends ("  A Dog!! " -> "a dog")."""
    text = " ".join(caption.lower().split())
    start, end = 0, len(text)
    while start < end and _is_edge_noise(text[start]):
        start += 1
    while end > start and _is_edge_noise(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_noise(char: str) -> bool:
    return char in string.punctuation or char.isspace() or unicodedata.category(char).startswith("P")


@dataclass(kw_only=True)
class DedupResult(StageResult):
    """The dedup tables, one entry per pool sample in pool order, plus metrics (and, from `stage.run`, outputs)."""

    keys: list[str]
    shards: list[str]
    sha256: list[str]  # image sha256 from each sample's raw JSON (keep.parquet carries it, the shard stage checks it)
    reason: list[str | None]  # None: kept
    duplicate_of: list[str | None]
    overlap_report: dict[str, dict[str, Any]]

    def kept_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.reason) if r is None]


def _survivor_order(keys: list[str], areas: np.ndarray, members: list[int]) -> list[int]:
    """`members` sorted so the preferred survivor comes first: largest area (width * height), then smallest key."""
    return sorted(members, key=lambda i: (-int(areas[i]), keys[i]))


def _remove_groups(pool: PoolMetadata, alive: np.ndarray, group_of: list[Any], reason: str,
                   removed_reason: list[str | None], duplicate_of: list[str | None]) -> int:
    """Within each group of alive indices keep the survivor, mark the rest `reason`; returns how many removed.

    group_of[j] is the group label of alive[j].
    """
    groups: dict[Any, list[int]] = {}
    for idx, group in zip(alive.tolist(), group_of, strict=True):
        groups.setdefault(group, []).append(idx)
    removed = 0
    areas = pool.areas()
    for members in groups.values():
        if len(members) < 2:
            continue
        ranked = _survivor_order(pool.keys, areas, members)
        survivor = pool.keys[ranked[0]]
        for idx in ranked[1:]:
            removed_reason[idx] = reason
            duplicate_of[idx] = survivor
            removed += 1
    return removed


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
    """Run the four passes over `pool`. `dask`: an existing Dask client (else one is made when cfg.use_dask)."""
    start = time.monotonic()
    signatures = PoolSignatures(pool, storage_cfg)
    tolerance = cfg.color_tolerance

    def confirm_eval(train_idx: np.ndarray, eval_signatures: np.ndarray) -> np.ndarray:
        assert tolerance is not None
        return signature_distance(signatures.get(train_idx), eval_signatures) <= tolerance

    n = len(pool)
    reason: list[str | None] = [None] * n
    duplicate_of: list[str | None] = [None] * n
    hashes = pool.phash_array()
    counts = dict.fromkeys(REASONS, 0)
    timings: dict[str, float] = {}

    tick = time.monotonic()
    overlap = find_overlap(hashes, pool.keys, eval_sets, cfg.near_dup_threshold, cfg.report_examples,
                           confirm=None if tolerance is None else confirm_eval)
    for idx, (match, _distance) in overlap.removed.items():
        reason[idx] = "eval_overlap"
        duplicate_of[idx] = match
    counts["eval_overlap"] = len(overlap.removed)
    timings["eval_overlap_s"] = time.monotonic() - tick

    def alive() -> np.ndarray:
        return np.array([i for i in range(n) if reason[i] is None], dtype=np.int64)

    tick = time.monotonic()
    if cfg.exact_caption_image:
        live = alive()
        groups = [(normalize_caption(pool.caption[i]), pool.sha256[i]) for i in live.tolist()]
        counts["exact_caption_image"] = _remove_groups(pool, live, groups, "exact_caption_image", reason, duplicate_of)
    live = alive()
    counts["exact_sha256"] = _remove_groups(pool, live, [pool.sha256[i] for i in live.tolist()], "exact_sha256",
                                            reason, duplicate_of)
    timings["exact_s"] = time.monotonic() - tick

    tick = time.monotonic()
    near_pairs = color_rejected = 0
    if cfg.near_duplicates:
        live = alive()
        live_hashes = hashes[live]
        report = for_task(progress, "near-duplicate bands")
        if cfg.use_dask:
            compute = compute or ComputeConfig()
            partitions = max(1, compute.dask_workers * compute.threads_per_worker * 2)
            if dask is not None:
                pairs = find_near_pairs_dask(live_hashes, cfg.near_dup_threshold, dask, partitions)
            else:
                with DaskRunner(compute) as runner:
                    pairs = find_near_pairs_dask(live_hashes, cfg.near_dup_threshold, runner.client_or_start(),
                                                 partitions)
        else:
            pairs = find_near_pairs(live_hashes, cfg.near_dup_threshold, progress=report)
        if tolerance is not None and pairs.size:
            # Confirm each pHash pair by colour; indices are positions in `live`, signatures are by pool index.
            close = signature_distance(signatures.get(live[pairs[:, 0]]), signatures.get(live[pairs[:, 1]]))
            color_rejected = int(np.count_nonzero(close > tolerance))
            pairs = pairs[close <= tolerance]
        near_pairs = int(pairs.shape[0])
        labels = cluster_labels(live.size, pairs)
        counts["near_duplicate"] = _remove_groups(pool, live, labels.tolist(), "near_duplicate", reason,
                                                  duplicate_of)
    timings["near_duplicate_s"] = time.monotonic() - tick

    kept = sum(1 for r in reason if r is None)
    metrics: dict[str, Any] = {
        "input_samples": n,
        "incomplete_samples": pool.incomplete,
        "raw_shards": pool.raw_shards,
        "kept": kept,
        "removed": n - kept,
        "removed_by_reason": counts,
        "near_duplicate_pairs": near_pairs,
        "near_duplicate_pairs_color_rejected": color_rejected,
        "eval_matches_color_rejected": {name: r["color_rejected"] for name, r in overlap.report.items()},
        "color_tolerance": tolerance,
        "images_decoded_for_color_check": signatures.decoded,
        "near_dup_threshold": cfg.near_dup_threshold,
        "eval_sets": {s.name: s.num_images for s in eval_sets},
        "eval_overlap_by_set": {name: r["matched"] for name, r in overlap.report.items()},
        "use_dask": cfg.use_dask,
        **timings,
        "dedup_seconds": time.monotonic() - start,
    }
    return DedupResult(keys=pool.keys, shards=pool.shards, sha256=pool.sha256, reason=reason, duplicate_of=duplicate_of,
                       overlap_report=overlap.report, metrics=metrics)


def write_outputs(result: DedupResult, output_dir: str, storage_cfg: StorageConfig | None = None) -> dict[str, str]:
    """keep.parquet, removed.parquet, overlap_report.json under `output_dir` (clip.formats.dedup; each atomic)."""
    kept = result.kept_indices()
    # sha256 ties the keep-list to the raw pool it was computed from: keys are positional and a collect rerun
    # reuses them for other images, so the shard stage refuses a keep-list whose sha256s the raw JSON contradicts.
    keep_uri = write_keep_list(output_dir, [result.keys[i] for i in kept], [result.shards[i] for i in kept],
                               [result.sha256[i] for i in kept], storage_cfg)
    removed = [i for i, r in enumerate(result.reason) if r is not None]
    removed_uri = write_removed_list(output_dir, [result.keys[i] for i in removed],
                                     [result.reason[i] for i in removed], [result.duplicate_of[i] for i in removed],
                                     [result.shards[i] for i in removed], storage_cfg)
    report_uri = write_overlap_report(output_dir, result.overlap_report, storage_cfg)
    return {"keep": keep_uri, "removed": removed_uri, "overlap_report": report_uri}
