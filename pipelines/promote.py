"""Promote stage: register the exported bundle in MLflow; move `champion` only if the new version is better.

    clip-pipeline promote [--params params.yaml] [--set promote.min_improvement=0.01]
    python -m pipelines.promote

Reads the bundle (`promote.bundle`) and the evaluation results (`promote.results`); registers a new version of
`promote.model_name` (default clip-<model>) and gives it `champion` or `challenger` (clip/promote/stage.py);
metrics to reports/metrics/promote.json.
"""

from __future__ import annotations

from clip.config import PipelineConfig
from clip.progress import Progress
from clip.promote import stage
from clip.result import StageResult
from pipelines._common import stage_main


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    return stage.run(cfg.promote, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, progress=progress)


def main(argv: list[str] | None = None) -> None:
    stage_main("promote", run, argv)


if __name__ == "__main__":
    main()
