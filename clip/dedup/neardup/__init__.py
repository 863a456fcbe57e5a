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

Modules: layout (the bands and keys, `search_layout`), pairs (every pair, exact), components (the bounded
component search dedup uses, and `cluster_labels`), cross (train-vs-evaluation), reference (the brute-force
references for tests and benchmarks). Import from this package: `from clip.dedup.neardup import find_near_duplicates`.

    found = find_near_duplicates(hashes, threshold=4, colors=colors, tolerance=40)   # NearDuplicates
    labels = found.labels(len(hashes))              # connected components, label = smallest member index
    pairs = find_near_pairs(hashes, threshold=4)    # every pair, [m, 2] int64 i < j (quadratic in a cluster)
"""

from clip.dedup.neardup.components import (
    BOUND_PER_KEY,
    LEADER_ROUNDS,
    SMALL_RUN,
    NearDuplicates,
    SearchStats,
    cluster_labels,
    color_distance,
    find_near_duplicates,
    find_near_duplicates_dask,
)
from clip.dedup.neardup.cross import find_cross_pairs
from clip.dedup.neardup.layout import (
    HASH_BITS,
    SearchLayout,
    as_hash_array,
    band_layout,
    search_layout,
    unique_pairs,
)
from clip.dedup.neardup.pairs import (
    all_pairs_comparisons,
    find_near_pairs,
    find_near_pairs_dask,
    find_pairs_in_partition,
)
from clip.dedup.neardup.reference import brute_force_labels, brute_force_pairs, same_partition

__all__ = [
    "BOUND_PER_KEY", "HASH_BITS", "LEADER_ROUNDS", "SMALL_RUN", "NearDuplicates", "SearchLayout", "SearchStats",
    "all_pairs_comparisons", "as_hash_array", "band_layout", "brute_force_labels", "brute_force_pairs",
    "cluster_labels", "color_distance", "find_cross_pairs", "find_near_duplicates", "find_near_duplicates_dask",
    "find_near_pairs", "find_near_pairs_dask", "find_pairs_in_partition", "same_partition", "search_layout",
    "unique_pairs",
]
