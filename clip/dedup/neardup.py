"""Sub-quadratic near-duplicate search over 64-bit perceptual hashes (multi-index hashing).

Two hashes within Hamming distance `t` differ in at most `t` bits. Split the 64 bits into `t + 1` disjoint bands:
by pigeonhole, at least one band holds none of the differing bits, so the pair agrees exactly on that band. So it
is enough to bucket every hash by (band index, band value) and compare only hashes that share a bucket; with
random-looking hashes a bucket holds n / 2**(64 / (t + 1)) hashes instead of n, which makes the search about
n * bucket_size rather than n**2.

Inside a band the hashes are sorted by band value, so a bucket is a run of equal values; the comparisons are
numpy-vectorised by offset: at offset d every position i is compared with i + d while both lie in one run
(XOR + popcount over whole arrays at once). A pair that agrees on several bands is found once per band; the
pair list is de-duplicated at the end.

The work splits into independent partitions (band index, hash(band value) % P): each partition's pairs depend on
that partition alone, so they can run as Dask tasks on a cluster and only the (small) pair list comes back.

    pairs = find_near_pairs(hashes, threshold=4)   # [m, 2] int64 index pairs i < j
    labels = cluster_labels(len(hashes), pairs)     # connected components (union-find)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

HASH_BITS = 64
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing constant: spreads band values over partitions
_CROSS_CHUNK = 4_000_000  # candidate pairs expanded at once in the train-vs-eval search (bounds memory)


def band_layout(threshold: int) -> list[tuple[int, int]]:
    """(shift, width) of each of the `threshold + 1` bands that tile the 64 bits; widths differ by at most 1."""
    if not 0 <= threshold < HASH_BITS:
        raise ValueError(f"near-duplicate threshold must be in [0, {HASH_BITS - 1}], got {threshold}")
    num_bands = threshold + 1
    base, extra = divmod(HASH_BITS, num_bands)
    layout = []
    shift = 0
    for band in range(num_bands):
        width = base + (1 if band < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def _band_values(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    mask = np.uint64((1 << width) - 1) if width < HASH_BITS else np.uint64(0xFFFFFFFFFFFFFFFF)
    return (hashes >> np.uint64(shift)) & mask


def _partition_of(values: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition index of each band value: a multiplicative hash, so nearby values land in different partitions."""
    mixed = values * _MIX  # wraps modulo 2**64 (intended)
    return (mixed >> np.uint64(32)) % np.uint64(num_partitions)


def as_hash_array(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Hashes as a 1-D uint64 array (accepts Python ints up to 2**64 - 1)."""
    arr = np.asarray(hashes, dtype=np.uint64) if not isinstance(hashes, np.ndarray) else hashes
    if arr.dtype != np.uint64:
        arr = arr.astype(np.uint64)
    if arr.ndim != 1:
        raise ValueError(f"hashes must be a 1-D array, got shape {arr.shape}")
    return arr


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


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Sorted, de-duplicated [m, 2] pair list (each row i < j)."""
    if pairs.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0)


def find_pairs_in_partition(hashes: np.ndarray, threshold: int, band: int, partition: int = 0,
                            num_partitions: int = 1) -> np.ndarray:
    """Near pairs found through one band, restricted to band values in one partition. [m, 2] int64."""
    hashes = as_hash_array(hashes)
    shift, width = band_layout(threshold)[band]
    values = _band_values(hashes, shift, width)
    if num_partitions > 1:
        members = np.flatnonzero(_partition_of(values, num_partitions) == np.uint64(partition))
        values = values[members]
    else:
        members = np.arange(hashes.shape[0])
    order = np.argsort(values, kind="stable")
    original = members[order]
    return _pairs_in_runs(values[order], hashes[original], original, threshold)


def find_near_pairs(hashes: Sequence[int] | np.ndarray, threshold: int, progress: Any = None) -> np.ndarray:
    """All index pairs (i < j) whose hashes are within Hamming distance `threshold`; [m, 2] int64, sorted.

    `progress`: optional callable(done_bands, total_bands) for a progress bar.
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


def find_cross_pairs(query: Sequence[int] | np.ndarray, reference: Sequence[int] | np.ndarray,
                     threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (query index, reference index, distance) within `threshold`, via the same banded search.

    Per band, the reference band values are sorted and each query finds its bucket with searchsorted; only
    bucket members are compared. Returns three int64 arrays of equal length, sorted by (query, reference).
    """
    query = as_hash_array(query)
    reference = as_hash_array(reference)
    empty = np.empty(0, dtype=np.int64)
    if query.size == 0 or reference.size == 0:
        return empty, empty, empty
    found_q: list[np.ndarray] = []
    found_r: list[np.ndarray] = []
    for shift, width in band_layout(threshold):
        ref_values = _band_values(reference, shift, width)
        ref_order = np.argsort(ref_values, kind="stable")
        ref_sorted = ref_values[ref_order]
        q_values = _band_values(query, shift, width)
        lo = np.searchsorted(ref_sorted, q_values, side="left")
        counts = np.searchsorted(ref_sorted, q_values, side="right") - lo
        candidates = np.flatnonzero(counts)
        # Expand (query, bucket member) candidates chunk by chunk so a huge bucket cannot exhaust memory.
        start = 0
        cumulative = np.cumsum(counts[candidates])
        while start < candidates.size:
            base = cumulative[start - 1] if start else 0
            stop = int(np.searchsorted(cumulative, base + _CROSS_CHUNK, side="right"))
            stop = max(stop, start + 1)
            chunk = candidates[start:stop]
            chunk_counts = counts[chunk]
            q_idx = np.repeat(chunk, chunk_counts)
            within = np.arange(q_idx.size) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
            r_idx = ref_order[np.repeat(lo[chunk], chunk_counts) + within]
            distance = np.bitwise_count(query[q_idx] ^ reference[r_idx])
            hit = distance <= threshold
            found_q.append(q_idx[hit])
            found_r.append(r_idx[hit])
            start = stop
    if not found_q:
        return empty, empty, empty
    pairs = unique_pairs(np.stack([np.concatenate(found_q), np.concatenate(found_r)], axis=1).astype(np.int64))
    if pairs.size == 0:
        return empty, empty, empty
    distance = np.bitwise_count(query[pairs[:, 0]] ^ reference[pairs[:, 1]]).astype(np.int64)
    return pairs[:, 0], pairs[:, 1], distance


def brute_force_pairs(hashes: Sequence[int] | np.ndarray, threshold: int) -> np.ndarray:
    """The O(n^2) reference: every pair i < j within `threshold`. For tests on small inputs only."""
    hashes = as_hash_array(hashes)
    n = hashes.shape[0]
    found = []
    for i in range(n - 1):
        distance = np.bitwise_count(hashes[i] ^ hashes[i + 1:])
        js = np.flatnonzero(distance <= threshold) + i + 1
        found.append(np.stack([np.full(js.size, i), js], axis=1))
    return unique_pairs(np.concatenate(found).astype(np.int64)) if found else np.empty((0, 2), dtype=np.int64)


def cluster_labels(num_items: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the graph whose edges are `pairs` (union-find); [num_items] int64 labels.

    Label = the smallest index in the component, so the labelling is deterministic.
    """
    parent = np.arange(num_items, dtype=np.int64)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            # Union by smaller index: the root is always the component's smallest member.
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    labels = np.arange(num_items, dtype=np.int64)
    touched = np.unique(np.asarray(pairs, dtype=np.int64))  # items in no pair are their own component
    labels[touched] = [find(int(i)) for i in touched]
    return labels
