"""Dedup stage: remove exact / near duplicates and evaluation-set overlap from the raw pool.

    python -m pipelines.dedup [--params params.yaml] [--set dedup.near_dup_threshold=4]

Reads `dedup.input_dir` (raw shards), writes `keep.parquet`, `removed.parquet`, `overlap_report.json` and
`metrics.json` under `dedup.output_dir` (docs/formats.md "Dedup output").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clip.config import PipelineConfig
from clip.dedup import run_dedup
from clip.dedup.progress import rich_progress
from pipelines._common import stage_main, write_metrics


def run(cfg: PipelineConfig) -> dict[str, Any]:
    with rich_progress() as progress:
        result = run_dedup(cfg.dedup, compute=cfg.compute, storage_cfg=cfg.storage,
                           synthetic_image_size=cfg.collect.synthetic.image_size, progress=progress)
    metrics = result.metrics
    write_metrics(Path(cfg.dedup.output_dir) / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main(run, "Remove duplicates and evaluation overlap from the raw pool -> data/dedup/.", argv)


if __name__ == "__main__":
    main()
