"""Every pair within the threshold, exact (k = 1: `threshold + 1` bands): quadratic inside a bucket, so a cluster
of m look-alike hashes costs m^2; for tests, benchmarks and small pools (dedup uses clip.dedup.neardup.components)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clip.dedup.neardup.layout import as_hash_array, band_layout, band_values, partition_of, unique_pairs


def _pairs_in_runs(sorted_values: np.ndarray, sorted_hashes: np.ndarray, order: np.ndarray,
                   threshold: int) -> np.ndarray:
    """Pairs (original indices) within `threshold` among hashes sharing a sorted run of equal band values.

    sorted_values / sorted_hashes / order: [k] band values ascending, the hashes in that order, their original
    indices. Returns [m, 2] int64 with the smaller index first.
    """
    k = sorted_values.shape[0]
    if k < 2:
        return np.empty((0, 2), dtype=np.int64)
    # run_end[i]: one past the last position of the run holding position i.
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    run_lengths = np.diff(np.append(starts, k))
    run_end = np.repeat(starts + run_lengths, run_lengths)
    active = np.flatnonzero(run_end - np.arange(k) > 1)  # positions with at least one later run member
    found: list[np.ndarray] = []
    offset = 1
    while active.size:
        partner = active + offset
        distance = np.bitwise_count(sorted_hashes[active] ^ sorted_hashes[partner])
        hit = distance <= threshold
        if hit.any():
            found.append(np.stack([order[active[hit]], order[partner[hit]]], axis=1))
        offset += 1
        active = active[run_end[active] > active + offset]
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64, copy=False)
    return np.sort(pairs, axis=1)


def find_pairs_in_partition(hashes: np.ndarray, threshold: int, band: int, partition: int = 0,
                            num_partitions: int = 1) -> np.ndarray:
    """Near pairs found through one band, restricted to band values in one partition. [m, 2] int64."""
    hashes = as_hash_array(hashes)
    shift, width = band_layout(threshold)[band]
    values = band_values(hashes, shift, width)
    if num_partitions > 1:
        members = np.flatnonzero(partition_of(values, num_partitions) == np.uint64(partition))
        values = values[members]
    else:
        members = np.arange(hashes.shape[0])
    order = np.argsort(values, kind="stable")
    original = members[order]
    return _pairs_in_runs(values[order], hashes[original], original, threshold)


def find_near_pairs(hashes: Sequence[int] | np.ndarray, threshold: int, progress: Any = None) -> np.ndarray:
    """All index pairs (i < j) whose hashes are within Hamming distance `threshold`; [m, 2] int64, sorted.

    Exact, but quadratic inside a bucket (a cluster of m look-alikes costs m^2): dedup uses
    `find_near_duplicates`. `progress`: optional callable(done_bands, total_bands).
    """
    hashes = as_hash_array(hashes)
    layout = band_layout(threshold)
    found = []
    for band in range(len(layout)):
        found.append(find_pairs_in_partition(hashes, threshold, band))
        if progress is not None:
            progress(band + 1, len(layout))
    return unique_pairs(np.concatenate(found)) if found else np.empty((0, 2), dtype=np.int64)


def find_near_pairs_dask(hashes: Sequence[int] | np.ndarray, threshold: int, client: Any,
                         num_partitions: int = 8) -> np.ndarray:
    """`find_near_pairs` as (bands x num_partitions) independent Dask tasks; same result.

    The hash array is scattered once to the workers; each task returns only its pairs, which are merged here.
    """
    hashes = as_hash_array(hashes)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    [remote] = client.scatter([hashes], broadcast=True)
    futures = [
        client.submit(find_pairs_in_partition, remote, threshold, band, part, num_partitions, pure=False)
        for band in range(threshold + 1)
        for part in range(num_partitions)
    ]
    found = client.gather(futures)
    return unique_pairs(np.concatenate(found)) if found else np.empty((0, 2), dtype=np.int64)


def all_pairs_comparisons(hashes: Sequence[int] | np.ndarray, threshold: int) -> int:
    """How many comparisons `find_near_pairs` makes: sum over bands and buckets of m * (m - 1) / 2."""
    hashes = as_hash_array(hashes)
    total = 0
    for shift, width in band_layout(threshold):
        _, counts = np.unique(band_values(hashes, shift, width), return_counts=True)
        total += int((counts.astype(np.int64) * (counts - 1) // 2).sum())
    return total
