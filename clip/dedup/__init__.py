"""Dedup and decontamination of the raw pool: exact duplicates, pHash near duplicates, evaluation overlap.

    from clip.dedup import stage
    result = stage.run(cfg.dedup, storage=cfg.storage, compute=cfg.compute, progress=progress)
    # writes keep.parquet, removed.parquet, overlap_report.json; result: DedupResult (metrics, outputs, tables)

Modules: stage (`run`: read the pool, dedup, write the tables), dedup (the passes, `deduplicate`, `DedupResult`),
pool (the pool's metadata as numpy columns, ~260 bytes per sample), neardup (multi-index pHash search: the bounded
component search dedup uses and the exact all-pairs search, in process or on Dask), decontam (evaluation sets and
overlap), color (the colour check that confirms pHash matches, from signatures stored at collect time).
"""

from clip.dedup.dedup import DedupResult, deduplicate, normalize_caption, write_outputs
from clip.dedup.neardup import (
    NearDuplicates,
    band_layout,
    brute_force_labels,
    brute_force_pairs,
    cluster_labels,
    find_cross_pairs,
    find_near_duplicates,
    find_near_duplicates_dask,
    find_near_pairs,
    find_near_pairs_dask,
)

__all__ = [
    "DedupResult",
    "NearDuplicates",
    "band_layout",
    "brute_force_labels",
    "brute_force_pairs",
    "cluster_labels",
    "deduplicate",
    "find_cross_pairs",
    "find_near_duplicates",
    "find_near_duplicates_dask",
    "find_near_pairs",
    "find_near_pairs_dask",
    "normalize_caption",
    "write_outputs",
]
