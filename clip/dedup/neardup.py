"""Near-duplicate search over 64-bit perceptual hashes (multi-index hashing), bounded on clustered pools.

Pigeonhole. Two hashes within Hamming distance `t` differ in at most `t` bits. Split the 64 bits into
`s = t + k` disjoint bands: the differing bits touch at most `t` bands, so the pair agrees exactly on at least `k`
of them. So it is enough to bucket every hash by each of the C(s, k) "keys" (the hash masked to a choice of `k`
bands) and compare only hashes that share a bucket, i.e. a run of equal key values once sorted. `k = 1` is the
classic layout (t + 1 bands); `search_layout` picks `k` from the pool size so that a bucket of random-looking hashes
stays small (10M hashes, t = 4: k = 2, 15 keys of ~21 bits, ~5 hashes per random bucket instead of ~1,200).

Two searches share that bucketing:

* `find_near_pairs` (and `find_pairs_in_partition`, `find_near_pairs_dask`, `brute_force_pairs`): every pair
  within `t`, exact, k = 1. Inside a bucket every member meets every other, so a cluster of m look-alike hashes
  costs m^2: for tests, benchmarks and small pools.
* `find_near_duplicates` (and `find_near_duplicates_dask`): the connected components that dedup needs, with the
  work per hash bounded whatever the clusters. Per key, a run of at most SMALL_RUN members is compared all-pairs
  (as above). A longer run is settled by leader rounds: the first unassigned member is the leader, every other
  unassigned member of the run is compared with it, and those that match (pHash within `t` and, when given, the
  colour check) are joined to it and leave the run; the leader leaves too. Once at most SMALL_RUN members remain,
  they are compared all-pairs. After LEADER_ROUNDS rounds a run that still has more is finished approximately: each
  remaining member is compared with its next SMALL_RUN - 1 neighbours only (counted in `SearchStats.truncated_runs`).

  Bound: charge each comparison to the member compared (not the leader) or, in the all-pairs / windowed tail, to
  the earlier of the two: a hash is charged at most once per leader round and SMALL_RUN - 1 times in the tail, so
  one key costs at most n * BOUND_PER_KEY comparisons (BOUND_PER_KEY = LEADER_ROUNDS + SMALL_RUN - 1 = 127) and
  the search at most n * keys * BOUND_PER_KEY (`SearchStats.bound_per_hash`), whatever the clusters; each
  comparison within the pHash threshold costs one colour check more. `SearchStats.comparisons` counts them
  (10M hashes with 100,000 in clusters of 1,000-60,000: 31 per hash, against ~4,200 per hash for all pairs).

  Exactness. The result is a set of confirmed edges whose connected components are compared below with the
  brute-force graph (an edge for every pair within `t` that passes the colour check). The components are EQUAL
  when (1) every brute-force component is a clique (every two members within `t` and colour-compatible: clusters
  of near-identical hashes, e.g. each within t/2 bits of a centre, and no chains), and (2) no run was truncated
  (`truncated_runs == 0`). Proof sketch: every brute-force edge (x, y) shares a bucket of some key (pigeonhole);
  a short run compares all its pairs; in a long run, a member leaves only by matching a leader, which puts it in
  the leader's component; under (1) neither x nor y can match a leader of another component, and the first
  leader taken from their component matches both. Where they can differ: a chain x ~ y ~ z with x and z more
  than `t` apart (or colour-incompatible) in one long run may be split when x leads and z stays (brute force
  joins them through y) - a split, never a false merge, since every edge kept is a confirmed pair; and in a
  truncated run, pairs more than SMALL_RUN - 1 places apart are not compared. Short runs, i.e. every pool whose
  buckets stay under SMALL_RUN, give exactly the brute-force edges, so small pools dedup exactly as before.

Colour: a leader that fails the colour check against a member does not absorb it; the member stays for a later
leader (one from its own colour class), so a bucket of one layout in c colours takes c rounds, not m^2 checks.

Dask: the work splits into independent (key, hash(key value) % P) partitions; a task receives only its
partition's hashes, indices and colour signatures, so a worker holds one partition (n / P hashes of one key, about
208 bytes each with colours), never the whole pool. Partitions are submitted one key at a time, so the driver
ships at most one key's worth (n hashes) at once; only the edges come back.

Train-vs-evaluation (`find_cross_pairs`): all pairs (query, reference) within `t`, exact. Both sides are first
collapsed to their distinct hash values, so the comparisons per bucket are (distinct query values) x (distinct
reference values): a cluster of m near-identical training hashes within r bits of a centre has at most
sum_{i<=r} C(64, i) distinct values (2,081 for r = 2) whatever m. The matching pairs are then expanded back to
indices (output-sized work).

    found = find_near_duplicates(hashes, threshold=4, colors=colors, tolerance=40)   # NearDuplicates
    labels = found.labels(len(hashes))              # connected components, label = smallest member index
    pairs = find_near_pairs(hashes, threshold=4)    # every pair, [m, 2] int64 i < j (quadratic in a cluster)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

HASH_BITS = 64
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing constant: spreads key values over partitions
_CROSS_CHUNK = 4_000_000  # candidate pairs expanded at once in the train-vs-eval search (bounds memory)
SMALL_RUN = 64  # runs up to this length are compared all-pairs (exact)
LEADER_ROUNDS = 64  # leader rounds per long run before its tail is windowed
BOUND_PER_KEY = LEADER_ROUNDS + SMALL_RUN - 1  # comparisons one hash takes part in, at most, per key
_MAX_KEYS = 256  # most keys (band combinations) search_layout accepts


def band_layout(threshold: int, num_bands: int | None = None) -> list[tuple[int, int]]:
    """(shift, width) of each band tiling the 64 bits (default `threshold + 1` bands); widths differ by <= 1."""
    if not 0 <= threshold < HASH_BITS:
        raise ValueError(f"near-duplicate threshold must be in [0, {HASH_BITS - 1}], got {threshold}")
    num_bands = threshold + 1 if num_bands is None else num_bands
    if not threshold < num_bands <= HASH_BITS:
        raise ValueError(f"num_bands must be in [{threshold + 1}, {HASH_BITS}], got {num_bands}")
    base, extra = divmod(HASH_BITS, num_bands)
    layout = []
    shift = 0
    for band in range(num_bands):
        width = base + (1 if band < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def _band_mask(shift: int, width: int) -> int:
    return ((1 << width) - 1) << shift


@dataclass(frozen=True)
class SearchLayout:
    """The buckets of the bounded search: `num_bands = threshold + agree` bands, a key per choice of `agree`."""

    threshold: int
    num_bands: int
    agree: int
    key_masks: tuple[int, ...]  # one 64-bit mask per key: the union of its `agree` bands

    @property
    def num_keys(self) -> int:
        return len(self.key_masks)


def search_layout(num_hashes: int, threshold: int) -> SearchLayout:
    """The layout for `num_hashes` hashes: `agree` (k) minimising keys * (sort + expected random bucket).

    Cost model per hash and key: ~log2(n) for the sort plus the expected random bucket n / 2**key_bits.
    """
    band_layout(threshold)  # validates threshold

    def layout_for(k: int) -> SearchLayout:
        bands = band_layout(threshold, threshold + k)
        masks = tuple(sum(_band_mask(*bands[b]) for b in chosen) for chosen in combinations(range(len(bands)), k))
        return SearchLayout(threshold, len(bands), k, masks)

    best, best_cost = 1, math.inf
    k = 1
    while threshold + k <= HASH_BITS and math.comb(threshold + k, k) <= _MAX_KEYS:
        key_bits = min(bin(mask).count("1") for mask in layout_for(k).key_masks)
        cost = math.comb(threshold + k, k) * (math.log2(max(num_hashes, 2)) + num_hashes / 2.0**key_bits)
        if cost < best_cost:
            best, best_cost = k, cost
        if num_hashes / 2.0**key_bits < 1:
            break  # a larger k only adds keys
        k += 1
    return layout_for(best)


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


# ------------------------------------------------------------------------------------------------------------
# Every pair (exact, quadratic inside a bucket)


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
        _, counts = np.unique(_band_values(hashes, shift, width), return_counts=True)
        total += int((counts.astype(np.int64) * (counts - 1) // 2).sum())
    return total


# ------------------------------------------------------------------------------------------------------------
# Bounded search for connected components (what dedup uses)


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


def _check_colors(hashes: np.ndarray, colors: np.ndarray | None, color_rows: np.ndarray | None,
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
    _check_colors(hashes, colors, color_rows, tolerance)
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
    _check_colors(hashes, colors, color_rows, tolerance)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    layout = search_layout(hashes.size, threshold)
    stats = SearchStats(num_keys=layout.num_keys, agree=layout.agree)
    edges: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    for mask in layout.key_masks:
        part = _partition_of(hashes & np.uint64(mask), num_partitions)
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


# ------------------------------------------------------------------------------------------------------------
# Train-vs-evaluation search


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
    _check_colors(hashes, colors, None, tolerance)
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
