"""Dedup and decontamination of the raw pool: exact duplicates, pHash near duplicates, evaluation overlap.

    from clip.dedup import run_dedup
    result = run_dedup(cfg.dedup, cfg.compute, cfg.storage)   # writes keep.parquet, removed.parquet, ...
"""

from clip.dedup.dedup import DedupResult, deduplicate, normalize_caption, run_dedup, write_outputs
from clip.dedup.neardup import (
    band_layout,
    brute_force_pairs,
    cluster_labels,
    find_cross_pairs,
    find_near_pairs,
    find_near_pairs_dask,
)

__all__ = [
    "DedupResult",
    "band_layout",
    "brute_force_pairs",
    "cluster_labels",
    "deduplicate",
    "find_cross_pairs",
    "find_near_pairs",
    "find_near_pairs_dask",
    "normalize_caption",
    "run_dedup",
    "write_outputs",
]
