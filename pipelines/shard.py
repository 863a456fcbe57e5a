"""Shard stage: write the kept samples into shuffled webdataset shards and publish a data version.

    python -m pipelines.shard [--params params.yaml] [--set shard.output=s3://bucket/shards]

Reads `shard.dedup_dir`/keep.parquet and the raw shards in `shard.input_dir`; writes `shard-NNNNN.tar`,
`sizes.json` and `manifest.json` (last) to `shard.output` (local folder or s3://), see docs/formats.md.
Metrics: `<output>/metrics.json` for a local output, `<staging_dir>/metrics.json` when the output is on S3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clip import storage
from clip.config import PipelineConfig
from clip.dedup.progress import rich_progress
from clip.shards import run_sharding
from pipelines._common import stage_main, write_metrics


def metrics_path(cfg: PipelineConfig) -> Path:
    folder = cfg.shard.staging_dir if storage.is_s3_uri(cfg.shard.output) else cfg.shard.output
    return Path(folder) / "metrics.json"


def run(cfg: PipelineConfig) -> dict[str, Any]:
    with rich_progress() as progress:
        metrics = run_sharding(cfg.shard, cfg.storage, progress=progress)
    write_metrics(metrics_path(cfg), metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main(run, "Write shuffled webdataset shards + manifest and publish them -> data/shards/.", argv)


if __name__ == "__main__":
    main()
