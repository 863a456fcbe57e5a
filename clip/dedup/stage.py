"""The dedup stage: raw pool -> evaluation overlap, exact and near duplicates removed -> keep / removed tables.

    from clip.dedup import stage
    result = stage.run(cfg.dedup, storage=cfg.storage, compute=cfg.compute, progress=progress)
    result.metrics["kept"], result.outputs["keep"], result.kept_indices()

Reads the raw pool under `dedup.input_dir` through clip.formats.raw (sample JSON only, no image decoded, plus the
pool's stats.json for the synthetic image size), writes `keep.parquet`, `removed.parquet` and
`overlap_report.json` under `dedup.output_dir` (docs/formats.md "Dedup output"). The passes and their order are
described in clip.dedup.dedup.

Progress tasks: "reading raw shards", "hashing eval set <name>" (one per `dedup.eval_dirs` folder),
"near-duplicate bands" (in-process search only; one step per search key, clip.dedup.neardup).
"""

from __future__ import annotations

import logging
import time

from clip.config import ComputeConfig, DedupConfig, StorageConfig, TrackingConfig
from clip.dedup.dedup import DedupResult, deduplicate, load_eval_sets, write_outputs
from clip.dedup.pool import read_pool_metadata
from clip.formats.raw import pool_source, pool_synthetic_image_size
from clip.progress import Progress, for_task

log = logging.getLogger(__name__)


def run(
    cfg: DedupConfig, *, storage: StorageConfig, compute: ComputeConfig, tracking: TrackingConfig | None = None,
    progress: Progress | None = None,
) -> DedupResult:
    """Read the raw pool under cfg.input_dir, deduplicate and decontaminate, write cfg.output_dir.

    Returns the tables (one entry per pool sample), the metrics and the written files (`keep`, `removed`,
    `overlap_report`). `tracking` is accepted for the common stage shape; dedup logs nothing to MLflow.
    """
    tick = time.monotonic()
    pool = read_pool_metadata(cfg.input_dir, storage, for_task(progress, "reading raw shards"))
    read_s = time.monotonic() - tick
    # The synthetic evaluation sets must be rendered at the size collect rendered the pool's scenes at: collect
    # records it in the pool's stats.json, so dedup needs nothing of collect's config.
    if cfg.decontaminate_synthetic is None:  # auto: the synthetic sets matter only for a synthetic pool
        cfg = cfg.model_copy(update={"decontaminate_synthetic": pool_source(cfg.input_dir, storage) == "synthetic"})
    eval_sets = load_eval_sets(cfg, pool_synthetic_image_size(cfg.input_dir, storage), progress)
    result = deduplicate(pool, cfg, eval_sets, compute=compute, progress=progress, storage_cfg=storage)
    result.metrics["read_seconds"] = read_s
    result.outputs = write_outputs(result, cfg.output_dir, storage)
    log.info("dedup: kept %d of %d samples (%s)", result.metrics["kept"], len(pool),
             result.metrics["removed_by_reason"])
    return result
