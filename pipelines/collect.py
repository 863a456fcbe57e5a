"""Collect stage: candidate (image, caption) pairs -> queries, matching, balancing -> raw webdataset shards.

    clip-pipeline collect [--params params.yaml] [--set collect.synthetic.num_samples=1024]
    python -m pipelines.collect --set collect.source=table --set collect.table.paths='[cc3m.tsv]'

Writes raw shards, candidates.parquet, query_counts.json and stats.json to `collect.output_dir` (default
data/raw/), the query list to `collect.queries_path`, metrics to reports/metrics/collect.json. Restartable: run it
again after an interruption and finished shards are kept (clip.collect.stage).
"""

from __future__ import annotations

from clip.collect import stage
from clip.config import PipelineConfig
from clip.progress import Progress
from clip.result import StageResult
from pipelines._common import stage_main


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    return stage.run(cfg.collect, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, progress=progress)


def main(argv: list[str] | None = None) -> None:
    stage_main("collect", run, argv)


if __name__ == "__main__":
    main()
