"""Data stages at scale (issue 16). Part a: the dedup core on 10M clustered 64-bit hashes; part b: collect -> dedup
-> shard on growing synthetic pools (benchmarks/data_stages.py).

    .venv/bin/python -m benchmarks.data_scale --part a                 # 10M hashes, threshold 4
    .venv/bin/python -m benchmarks.data_scale --part a --n 1000000     # smaller
    .venv/bin/python -m benchmarks.data_scale --part b                 # benchmarks.data_stages.main

Part a: `--n` generated hashes, `--clustered` of them (1%) in clusters of 1,000 to 100,000 near-identical hashes
(each member within 2 bits of its centre, so any two within 4), the rest random. Times the dedup core, i.e. the
bounded near-duplicate search (clip.dedup.neardup.find_near_duplicates) and its connected components, with the
process's peak RSS; then checks the components against brute force on a 20,000-hash sample (half from the
clusters, half random): the full run's labels restricted to the sample must group it exactly as the brute-force
components of the sample do (valid because every cluster is a clique). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import time

import numpy as np

from clip.dedup.neardup import (
    all_pairs_comparisons,
    brute_force_labels,
    find_near_duplicates,
    same_partition,
)

CLUSTER_SIZES = (60_000, 20_000, 10_000, 5_000, 2_000, 1_000, 1_000, 1_000)  # 100,000 = 1% of 10M


def cluster_sizes(total: int) -> list[int]:
    """CLUSTER_SIZES scaled to about `total` members, each cluster kept within 1,000 .. 100,000."""
    scale = total / sum(CLUSTER_SIZES)
    return [min(100_000, max(1_000, round(s * scale))) for s in CLUSTER_SIZES]


def make_pool(n: int, clustered: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n] uint64 hashes, shuffled, and [n] bool: member of a cluster."""
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(clustered)
    parts = []
    for size in sizes:
        centre = rng.integers(0, 2**64, dtype=np.uint64)
        flips = np.zeros(size, dtype=np.uint64)
        for _ in range(2):  # up to 2 distinct bits flipped (a repeated bit undoes itself)
            bit = rng.integers(0, 64, size=size).astype(np.uint64)
            flips ^= np.where(rng.random(size) < 0.8, np.uint64(1) << bit, np.uint64(0))
        parts.append(centre ^ flips)
    in_clusters = sum(sizes)
    parts.append(rng.integers(0, 2**64, size=n - in_clusters, dtype=np.uint64))
    hashes = np.concatenate(parts)
    is_clustered = np.arange(n) < in_clusters
    order = rng.permutation(n)
    return hashes[order], is_clustered[order]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def part_a(n: int, clustered: int, threshold: int, sample: int, seed: int) -> dict:
    hashes, is_clustered = make_pool(n, clustered, seed)
    rss_before = peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    found = find_near_duplicates(hashes, threshold)
    search_s = time.perf_counter() - start
    labels = found.labels(n)
    core_s, core_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    rss_core = peak_rss_mb()

    rng = np.random.default_rng(seed + 1)
    half = sample // 2
    picked = np.concatenate([rng.choice(np.flatnonzero(is_clustered), half, replace=False),
                             rng.choice(np.flatnonzero(~is_clustered), sample - half, replace=False)])
    tick = time.perf_counter()
    reference = brute_force_labels(hashes[picked], threshold)
    brute_s = time.perf_counter() - tick
    sizes = np.bincount(labels)
    result = {
        "n": n, "threshold": threshold, "clustered": int(is_clustered.sum()),
        "cluster_sizes": cluster_sizes(clustered),
        "keys": found.stats.num_keys, "agree": found.stats.agree,
        "core_seconds": round(core_s, 1), "core_cpu_seconds": round(core_cpu_s, 1),
        "search_seconds": round(search_s, 1), "components_seconds": round(core_s - search_s, 1),
        "peak_rss_mb": round(rss_core), "peak_rss_before_core_mb": round(rss_before),
        "edges": int(found.edges.shape[0]), "largest_component": int(sizes.max()),
        "components_with_duplicates": int(np.count_nonzero(sizes > 1)),
        "comparisons": found.stats.comparisons,
        "comparisons_per_hash": round(found.stats.comparisons / n, 2),
        "bound_per_hash": found.stats.bound_per_hash,
        "long_runs": found.stats.long_runs, "truncated_runs": found.stats.truncated_runs,
        "largest_run": found.stats.largest_run, "leader_rounds": found.stats.leader_rounds,
        "all_pairs_comparisons": all_pairs_comparisons(hashes, threshold),
        "sample": sample, "sample_components_with_duplicates": int(np.count_nonzero(np.bincount(reference) > 1)),
        "sample_equals_brute_force": same_partition(labels[picked], reference),
        "brute_force_sample_seconds": round(brute_s, 1),
    }
    return result


def print_table(result: dict) -> None:
    rows = [
        ("hashes", f"{result['n']:,} ({result['clustered']:,} in {len(result['cluster_sizes'])} clusters)"),
        ("keys (bands agreeing)", f"{result['keys']} (k = {result['agree']})"),
        ("dedup core wall / CPU", f"{result['core_seconds']} s / {result['core_cpu_seconds']} s "
                                  f"(search {result['search_seconds']} s, components {result['components_seconds']} s)"),
        ("peak RSS", f"{result['peak_rss_mb']:,} MB"),
        ("comparisons", f"{result['comparisons']:,} ({result['comparisons_per_hash']} per hash, "
                        f"bound {result['bound_per_hash']})"),
        ("all-pairs banded search would make", f"{result['all_pairs_comparisons']:,}"),
        ("long runs / truncated", f"{result['long_runs']:,} / {result['truncated_runs']}"),
        ("largest component", f"{result['largest_component']:,}"),
        (f"{result['sample']:,}-hash sample = brute force", f"{result['sample_equals_brute_force']} "
                                                           f"({result['brute_force_sample_seconds']} s)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("a", "b"), default="a")
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--clustered", type=int, default=None, help="hashes in clusters (default: 1%% of --n)")
    parser.add_argument("--threshold", type=int, default=4)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args(argv)
    if args.part == "b":
        if importlib.util.find_spec("benchmarks.data_stages") is None:
            raise SystemExit("part b lives in benchmarks/data_stages.py, which is not there")
        from benchmarks import data_stages

        data_stages.main(rest)
        return
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    result = part_a(args.n, args.clustered if args.clustered is not None else args.n // 100, args.threshold,
                    args.sample, args.seed)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
