"""Train-vs-evaluation: every (query, reference) pair within the threshold, exact, over the distinct hash values of
each side (package docstring "Train-vs-evaluation")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip.dedup.neardup.layout import as_hash_array, search_layout, unique_pairs

_CROSS_CHUNK = 4_000_000  # candidate pairs expanded at once in the train-vs-eval search (bounds memory)


def _cross_value_pairs(query: np.ndarray, reference: np.ndarray, threshold: int) -> np.ndarray:
    """[m, 2] int64 unique (query row, reference row) within `threshold`, over distinct values on both sides."""
    found: list[np.ndarray] = []
    layout = search_layout(query.size + reference.size, threshold)
    for mask in layout.key_masks:
        ref_values = reference & np.uint64(mask)
        ref_order = np.argsort(ref_values, kind="stable")
        ref_sorted = ref_values[ref_order]
        q_values = query & np.uint64(mask)
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
            hit = np.bitwise_count(query[q_idx] ^ reference[r_idx]) <= threshold
            found.append(np.stack([q_idx[hit], r_idx[hit]], axis=1))
            start = stop
    return unique_pairs(np.concatenate(found).astype(np.int64)) if found else np.empty((0, 2), dtype=np.int64)


def _members_by_value(inverse: np.ndarray, num_values: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices grouped by distinct value, start of each value's group [num_values + 1])."""
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(num_values + 1))
    return order.astype(np.int64), bounds


def find_cross_pairs(query: Sequence[int] | np.ndarray, reference: Sequence[int] | np.ndarray,
                     threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (query index, reference index, distance) within `threshold`, via the same banded search.

    Exact. The comparisons run over distinct hash values of each side (module docstring); the matches are then
    expanded to every index holding those values. Returns three int64 arrays of equal length, sorted by
    (query, reference).
    """
    query = as_hash_array(query)
    reference = as_hash_array(reference)
    empty = np.empty(0, dtype=np.int64)
    if query.size == 0 or reference.size == 0:
        return empty, empty, empty
    q_values, q_inverse = np.unique(query, return_inverse=True)
    r_values, r_inverse = np.unique(reference, return_inverse=True)
    value_pairs = _cross_value_pairs(q_values, r_values, threshold)
    if value_pairs.size == 0:
        return empty, empty, empty
    q_members, q_bounds = _members_by_value(q_inverse.reshape(-1), q_values.size)
    r_members, r_bounds = _members_by_value(r_inverse.reshape(-1), r_values.size)
    q_count = np.diff(q_bounds)[value_pairs[:, 0]]
    r_count = np.diff(r_bounds)[value_pairs[:, 1]]
    # Every (query member, reference member) of each matching value pair: a pair expands to q_count * r_count.
    per_pair = q_count * r_count
    pair_of = np.repeat(np.arange(value_pairs.shape[0]), per_pair)
    within = np.arange(pair_of.size) - np.repeat(np.cumsum(per_pair) - per_pair, per_pair)
    q_idx = q_members[q_bounds[value_pairs[pair_of, 0]] + within // r_count[pair_of]]
    r_idx = r_members[r_bounds[value_pairs[pair_of, 1]] + within % r_count[pair_of]]
    distance = np.bitwise_count(query[q_idx] ^ reference[r_idx]).astype(np.int64)
    order = np.lexsort((r_idx, q_idx))
    return q_idx[order], r_idx[order], distance[order]
