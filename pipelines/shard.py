"""Shard stage: write the kept samples into shuffled webdataset shards and publish a data version.

    clip-pipeline shard [--params params.yaml] [--set shard.output=s3://bucket/shards]
    python -m pipelines.shard --set shard.samples_per_shard=5000

Reads `shard.dedup_dir`'s keep-list and the raw shards in `shard.input_dir`; writes shard-NNNNN.tar, sizes.json
and manifest.json (last) to `shard.output`, a local folder or s3:// (docs/formats.md), metrics to
reports/metrics/shard.json.
"""

from __future__ import annotations

from clip.config import PipelineConfig
from clip.progress import Progress
from clip.result import StageResult
from clip.shards import stage
from pipelines._common import stage_main


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    return stage.run(cfg.shard, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, progress=progress)


def main(argv: list[str] | None = None) -> None:
    stage_main("shard", run, argv)


if __name__ == "__main__":
    main()
