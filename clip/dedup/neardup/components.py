"""The bounded search for connected components that dedup uses: leader rounds in long runs, all pairs in short
ones, the colour check on every pHash match (package docstring: bound, exactness, colour, Dask)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip.dedup.neardup.layout import as_hash_array, partition_of, search_layout, unique_pairs

SMALL_RUN = 64  # runs up to this length are compared all-pairs (exact)
LEADER_ROUNDS = 64  # leader rounds per long run before its tail is windowed
BOUND_PER_KEY = LEADER_ROUNDS + SMALL_RUN - 1  # comparisons one hash takes part in, at most, per key


@dataclass
class SearchStats:
    """What the bounded search did. `comparisons` <= n * `bound_per_hash` always."""

    num_keys: int = 0
    agree: int = 0  # k: bands a key combines
    comparisons: int = 0  # pHash comparisons (XOR + popcount)
    color_comparisons: int = 0  # colour checks (one per pHash comparison within the threshold)
    leader_rounds: int = 0  # largest number of leader rounds any long run took
    long_runs: int = 0  # runs longer than SMALL_RUN (settled by leader rounds)
    truncated_runs: int = 0  # long runs still above SMALL_RUN after LEADER_ROUNDS: tail compared by window
    largest_run: int = 0

    @property
    def bound_per_hash(self) -> int:
        return self.num_keys * BOUND_PER_KEY

    def add(self, other: SearchStats) -> None:
        for name in ("comparisons", "color_comparisons", "long_runs", "truncated_runs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.leader_rounds = max(self.leader_rounds, other.leader_rounds)
        self.largest_run = max(self.largest_run, other.largest_run)


@dataclass
class NearDuplicates:
    """Result of the bounded search: confirmed edges (their components are the near-duplicate clusters)."""

    edges: np.ndarray  # [m, 2] int64, i < j, unique: pHash within threshold and colour confirmed
    rejected: np.ndarray  # [r, 2] int64, i < j, unique: pHash within threshold, refused by the colour check
    stats: SearchStats

    @property
    def color_rejected(self) -> int:
        return int(self.rejected.shape[0])

    def labels(self, num_items: int) -> np.ndarray:
        """[num_items] int64 component labels, label = smallest member index."""
        return cluster_labels(num_items, self.edges)


class _EdgeSink:
    """Edges found in one key (original indices), the colour-rejected pairs, and the counters."""

    def __init__(self, hashes: np.ndarray, index: np.ndarray, threshold: int, colors: np.ndarray | None,
                 color_rows: np.ndarray | None, tolerance: float | None, stats: SearchStats) -> None:
        self.hashes = hashes  # [k] uint64, the key's members in sorted order
        self.index = index  # [k] int64 original index of each
        self.threshold = threshold
        self.colors = colors  # [rows, 192] uint8 (not reordered: no copy), or None
        self.color_rows = color_rows  # [k] int64: row of `colors` of each sorted member
        self.tolerance = tolerance
        self.stats = stats
        self.edges: list[np.ndarray] = []
        self.rejected: list[np.ndarray] = []

    def compare(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Compare positions a[i] with b[i]; record confirmed edges and colour rejections; [len(a)] bool matched."""
        self.stats.comparisons += int(a.size)
        matched = np.bitwise_count(self.hashes[a] ^ self.hashes[b]) <= self.threshold
        if self.colors is not None and self.tolerance is not None and matched.any():
            close = np.flatnonzero(matched)
            self.stats.color_comparisons += int(close.size)
            assert self.color_rows is not None
            ok = (color_distance(self.colors[self.color_rows[a[close]]], self.colors[self.color_rows[b[close]]])
                  <= self.tolerance)
            if not ok.all():
                self.rejected.append(np.stack([self.index[a[close[~ok]]], self.index[b[close[~ok]]]], axis=1))
                matched[close[~ok]] = False
        if matched.any():
            self.edges.append(np.stack([self.index[a[matched]], self.index[b[matched]]], axis=1))
        return matched

    def within_segments(self, positions: np.ndarray, segment: np.ndarray) -> None:
        """Compare each of `positions` with its next SMALL_RUN - 1 neighbours in the same segment.

        positions: [p] ascending positions; segment: [p] segment id of each (equal ids are contiguous). A segment
        of at most SMALL_RUN members is thus compared all-pairs."""
        p = positions.size
        if p < 2:
            return
        starts = np.flatnonzero(np.concatenate(([True], segment[1:] != segment[:-1])))
        lengths = np.diff(np.append(starts, p))
        seg_end = np.repeat(starts + lengths, lengths)
        active = np.flatnonzero(seg_end - np.arange(p) > 1)
        offset = 1
        while active.size and offset < SMALL_RUN:
            self.compare(positions[active], positions[active + offset])
            offset += 1
            active = active[seg_end[active] > active + offset]


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest absolute difference between colour signatures, row-wise: a, b [k, 192] -> [k] int."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)


def _key_edges(hashes: np.ndarray, index: np.ndarray, key_values: np.ndarray, threshold: int,
               colors: np.ndarray | None, color_rows: np.ndarray | None,
               tolerance: float | None) -> tuple[list[np.ndarray], list[np.ndarray], SearchStats]:
    """Edges of one key (or one partition of it) over the given members; see the module docstring.

    hashes, index, key_values: [k] the members, their original indices, their key values; colors[color_rows[i]]
    is member i's signature (color_rows None: row i)."""
    stats = SearchStats()
    order = np.argsort(key_values, kind="stable")
    sorted_keys = key_values[order]
    rows = None
    if colors is not None:
        rows = order if color_rows is None else color_rows[order]
    sink = _EdgeSink(hashes[order], index[order], threshold, colors, rows, tolerance, stats)
    k = order.size
    if k < 2:
        return [], [], stats
    starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    lengths = np.diff(np.append(starts, k))
    stats.largest_run = int(lengths.max())
    run_of = np.repeat(np.arange(starts.size), lengths)  # [k] run id of each position
    is_long = np.repeat(lengths > SMALL_RUN, lengths)
    tails: list[np.ndarray] = [np.flatnonzero(~is_long)]  # positions finished by the all-pairs pass
    remaining = np.flatnonzero(is_long)
    stats.long_runs = int(np.count_nonzero(lengths > SMALL_RUN))
    rounds = 0
    while remaining.size and rounds < LEADER_ROUNDS:
        rounds += 1
        runs = run_of[remaining]
        first = np.concatenate(([True], runs[1:] != runs[:-1]))  # each run's leader: its first unassigned member
        leader_of = remaining[first][np.cumsum(first) - 1]
        others = ~first
        matched = sink.compare(leader_of[others], remaining[others])
        remaining = remaining[others][~matched]
        # Runs now down to SMALL_RUN members leave the rounds for the all-pairs pass.
        runs = run_of[remaining]
        run_starts = np.flatnonzero(np.concatenate(([True], runs[1:] != runs[:-1]))) if remaining.size else remaining
        left = np.diff(np.append(run_starts, remaining.size))
        done = np.repeat(left <= SMALL_RUN, left)
        tails.append(remaining[done])
        remaining = remaining[~done]
    stats.leader_rounds = rounds
    if remaining.size:
        stats.truncated_runs = int(np.unique(run_of[remaining]).size)
        tails.append(remaining)
    tail = np.sort(np.concatenate(tails))
    sink.within_segments(tail, run_of[tail])
    return sink.edges, sink.rejected, stats


def _merge_codes(found: list[np.ndarray]) -> np.ndarray:
    """Unique [m, 2] int64 rows (i < j) of several edge lists."""
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found).astype(np.int64, copy=False), axis=1)
    return unique_pairs(pairs)


def check_colors(hashes: np.ndarray, colors: np.ndarray | None, color_rows: np.ndarray | None,
                  tolerance: float | None) -> None:
    if (colors is None) != (tolerance is None):
        raise ValueError("colors and tolerance go together: give both or neither")
    if colors is None:
        return
    rows = hashes.shape[0] if color_rows is None else int(color_rows.max(initial=-1)) + 1
    if colors.ndim != 2 or colors.shape[0] < rows or colors.dtype != np.uint8:
        raise ValueError(f"colors must be [>= {rows}, 192] uint8, got {colors.shape} {colors.dtype}")
    if color_rows is not None and color_rows.shape != hashes.shape:
        raise ValueError(f"color_rows must be [{hashes.shape[0]}], got {color_rows.shape}")


def find_near_duplicates(hashes: Sequence[int] | np.ndarray, threshold: int, colors: np.ndarray | None = None,
                         tolerance: float | None = None, progress: Callable[[int, int], None] | None = None,
                         color_rows: np.ndarray | None = None) -> NearDuplicates:
    """Near-duplicate edges with bounded work per hash (module docstring: bound and exactness).

    hashes: [n] uint64; colors: optional [rows, 192] uint8 colour signatures with `tolerance` (largest absolute
    difference) confirming each pHash match: hash i's is colors[color_rows[i]] (color_rows None: colors[i]), so a
    subset of a pool is searched without copying its colours. `progress`: optional callable(done_keys, total_keys).
    """
    hashes = as_hash_array(hashes)
    check_colors(hashes, colors, color_rows, tolerance)
    layout = search_layout(hashes.size, threshold)
    index = np.arange(hashes.size, dtype=np.int64)
    stats = SearchStats(num_keys=layout.num_keys, agree=layout.agree)
    edges: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    for done, mask in enumerate(layout.key_masks, start=1):
        found, refused, key_stats = _key_edges(hashes, index, hashes & np.uint64(mask), threshold, colors,
                                               color_rows, tolerance)
        edges += found
        rejected += refused
        stats.add(key_stats)
        if progress is not None:
            progress(done, layout.num_keys)
    return NearDuplicates(_merge_codes(edges), _merge_codes(rejected), stats)


def _partition_edges(index: np.ndarray, hashes: np.ndarray, mask: int, threshold: int, colors: np.ndarray | None,
                     tolerance: float | None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """One Dask task: the edges of one key over one partition's members (original indices in `index`)."""
    found, refused, stats = _key_edges(hashes, index, hashes & np.uint64(mask), threshold, colors, None, tolerance)
    return _merge_codes(found), _merge_codes(refused), stats


def find_near_duplicates_dask(hashes: Sequence[int] | np.ndarray, threshold: int, client: Any,
                              num_partitions: int = 8, colors: np.ndarray | None = None,
                              tolerance: float | None = None, color_rows: np.ndarray | None = None) -> NearDuplicates:
    """`find_near_duplicates` as (keys x num_partitions) Dask tasks, each given only its partition; same edges.

    A run of equal key values lies in one partition, so every task sees whole runs and the edges equal the
    in-process search's. Tasks are submitted one key at a time (the driver ships at most n hashes at once).
    """
    hashes = as_hash_array(hashes)
    check_colors(hashes, colors, color_rows, tolerance)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    layout = search_layout(hashes.size, threshold)
    stats = SearchStats(num_keys=layout.num_keys, agree=layout.agree)
    edges: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    for mask in layout.key_masks:
        part = partition_of(hashes & np.uint64(mask), num_partitions)
        futures = []
        for p in range(num_partitions):
            members = np.flatnonzero(part == np.uint64(p))
            part_colors = None
            if colors is not None:  # the partition's own signatures: a worker never holds the pool's
                part_colors = colors[members if color_rows is None else color_rows[members]]
            futures.append(client.submit(_partition_edges, members, hashes[members], mask, threshold, part_colors,
                                         tolerance, pure=False))
        for found, refused, part_stats in client.gather(futures):
            edges.append(found)
            rejected.append(refused)
            stats.add(part_stats)
    return NearDuplicates(_merge_codes(edges), _merge_codes(rejected), stats)


def cluster_labels(num_items: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the graph whose edges are `pairs`; [num_items] int64 labels.

    Label = the smallest index in the component, so the labelling is deterministic.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if num_items == 0:
        return np.empty(0, dtype=np.int64)
    graph = coo_matrix((np.ones(pairs.shape[0], dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(num_items, num_items))
    _, component = connected_components(graph, directed=False)
    # np.unique's return_index gives each component's first (= smallest) member.
    _, first = np.unique(component, return_index=True)
    return first[component].astype(np.int64)
