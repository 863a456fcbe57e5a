"""The O(n^2) references the fast searches are checked against: every pair, the components, and a comparison of
two labelings. For tests and benchmarks on small inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip.dedup.neardup.components import check_colors, color_distance
from clip.dedup.neardup.layout import as_hash_array, unique_pairs


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


def brute_force_labels(hashes: Sequence[int] | np.ndarray, threshold: int, colors: np.ndarray | None = None,
                       tolerance: float | None = None, block: int = 1024) -> np.ndarray:
    """The O(n^2) reference for components: [n] labels (smallest member) of the graph with an edge for every pair
    within `threshold` (and, with colours, within `tolerance`). Breadth-first: each reached hash is compared with
    every unreached one, `block` rows at a time; no pair list is built. For tests and benchmarks."""
    hashes = as_hash_array(hashes)
    check_colors(hashes, colors, None, tolerance)
    labels = np.full(hashes.size, -1, dtype=np.int64)
    for seed in range(hashes.size):
        if labels[seed] >= 0:
            continue
        labels[seed] = seed
        frontier = np.array([seed])
        while frontier.size:
            reached: list[np.ndarray] = []
            unreached = np.flatnonzero(labels < 0)
            for start in range(0, frontier.size, block):
                rows = frontier[start:start + block]
                f, u = np.nonzero(np.bitwise_count(hashes[rows][:, None] ^ hashes[unreached][None, :]) <= threshold)
                if colors is not None and f.size:
                    assert tolerance is not None
                    u = u[color_distance(colors[rows[f]], colors[unreached[u]]) <= tolerance]
                reached.append(unreached[u])
            frontier = np.unique(np.concatenate(reached))
            labels[frontier] = seed
    return labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two [n] labelings group the items identically (whatever the label values)."""
    def canonical(labels: np.ndarray) -> np.ndarray:
        _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
        return first[inverse.reshape(-1)]
    return a.shape == b.shape and bool(np.array_equal(canonical(a), canonical(b)))
