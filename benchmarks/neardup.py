"""Near-duplicate search benchmark: banded multi-index search over 1,000,000 random 64-bit pHashes.

1% of the hashes are planted near duplicates: copies of another hash with 1..threshold random bits flipped
(distance <= 4 by default). The search must find >= 99% of the planted pairs; we report wall time, recall, the
pairs found, and what an O(n^2) brute-force scan would cost (timed on a sample of rows, extrapolated).

    .venv/bin/python benchmarks/neardup.py                      # 1M hashes, threshold 4
    .venv/bin/python benchmarks/neardup.py --n 200000 --dask    # also the Dask-partitioned search (local cluster)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from clip.dedup.neardup import cluster_labels, find_near_pairs, find_near_pairs_dask


def make_hashes(n: int, planted_fraction: float, threshold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n] uint64 random hashes with planted near copies; returns (hashes, planted [m, 2] source/copy index)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    m = int(n * planted_fraction)
    chosen = rng.choice(n, size=2 * m, replace=False)
    sources, copies = chosen[:m], chosen[m:]
    flips = np.zeros(m, dtype=np.uint64)
    counts = rng.integers(1, threshold + 1, size=m)
    for k in range(threshold):  # set up to `threshold` distinct random bits per copy
        bit = rng.integers(0, 64, size=m).astype(np.uint64)
        flips |= np.where(k < counts, np.uint64(1) << bit, np.uint64(0))
    hashes[copies] = hashes[sources] ^ flips  # repeated bits collapse: distance stays in 0..threshold
    return hashes, np.sort(np.stack([sources, copies], axis=1), axis=1)


def recall_of(found: np.ndarray, planted: np.ndarray, n: int) -> float:
    codes = set((found[:, 0] * n + found[:, 1]).tolist())
    return float(np.mean([int(a) * n + int(b) in codes for a, b in planted]))


def brute_force_estimate(hashes: np.ndarray, rows: int = 200) -> float:
    """Seconds an O(n^2) scan would take: `rows` full rows timed, scaled to n(n-1)/2 comparisons."""
    n = hashes.size
    start = time.perf_counter()
    for i in range(rows):
        np.bitwise_count(hashes[i] ^ hashes)
    per_comparison = (time.perf_counter() - start) / (rows * n)
    return per_comparison * n * (n - 1) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--planted", type=float, default=0.01)
    parser.add_argument("--threshold", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dask", action="store_true", help="also run the partitioned search on a local Dask cluster")
    args = parser.parse_args()

    hashes, planted = make_hashes(args.n, args.planted, args.threshold, args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    pairs = find_near_pairs(hashes, args.threshold)
    search_s, search_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    labels = cluster_labels(args.n, pairs)
    total_s = time.perf_counter() - start
    result = {
        "n": args.n, "threshold": args.threshold, "planted_pairs": int(planted.shape[0]),
        "pairs_found": int(pairs.shape[0]), "recall": recall_of(pairs, planted, args.n),
        "search_seconds": round(search_s, 2), "search_cpu_seconds": round(search_cpu_s, 2), "search_plus_union_find_seconds": round(total_s, 2),
        "clusters_with_duplicates": int(np.unique(labels[pairs[:, 1]]).size) if pairs.size else 0,
        "brute_force_estimate_seconds": round(brute_force_estimate(hashes), 1),
    }
    if args.dask:
        from dask.distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            start = time.perf_counter()
            dask_pairs = find_near_pairs_dask(hashes, args.threshold, client, num_partitions=4)
            result["dask_seconds"] = round(time.perf_counter() - start, 2)
            result["dask_same_pairs"] = bool(np.array_equal(dask_pairs, pairs))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
