"""Dedup stage: remove exact / near duplicates and evaluation-set overlap from the raw pool.

    clip-pipeline dedup [--params params.yaml] [--set dedup.near_dup_threshold=4]
    python -m pipelines.dedup --set dedup.eval_dirs='[data/eval/imagenet]'

Reads the raw shards in `dedup.input_dir`; writes keep.parquet, removed.parquet and overlap_report.json to
`dedup.output_dir` (default data/dedup/, docs/formats.md "Dedup output"), metrics to reports/metrics/dedup.json.
"""

from __future__ import annotations

from clip.config import DedupConfig, PipelineConfig
from clip.dedup import stage
from clip.progress import Progress
from clip.result import StageResult
from pipelines._common import stage_main


def dedup_section(cfg: PipelineConfig) -> DedupConfig:
    """The dedup section with its evaluation data resolved: null `eval_datasets` / `eval_root` follow the
    evaluation stage's `evaluate.datasets` / `evaluate.data_root`, so evaluation data is named once and the
    training pool can never contain it."""
    update = {}
    if cfg.dedup.eval_datasets is None:
        update["eval_datasets"] = list(cfg.evaluate.datasets)
    if cfg.dedup.eval_root is None:
        update["eval_root"] = cfg.evaluate.data_root
    return cfg.dedup.model_copy(update=update)


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    return stage.run(dedup_section(cfg), storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                     progress=progress)


def main(argv: list[str] | None = None) -> None:
    stage_main("dedup", run, argv)


if __name__ == "__main__":
    main()
