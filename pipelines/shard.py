"""Shard stage: write the kept samples into shuffled webdataset shards and publish a data version.

    clip-pipeline shard [--params params.yaml] [--set shard.output=s3://bucket/shards]
    python -m pipelines.shard --set shard.samples_per_shard=5000

Reads `shard.dedup_dir`'s keep-list and the raw shards in `shard.input_dir`; writes shard-NNNNN.tar, sizes.json
and manifest.json (last) to `shard.output`, a local folder or s3:// (docs/formats.md), metrics to
reports/metrics/shard.json. When a Prefect API is configured (PREFECT_API_URL) and the version is new, emits
`clip.data.published` with it (pipelines/events.py: not from a flow run that trains it), which starts the
on-new-data deployment; the metrics' `data_published_event` says whether it did.
"""

from __future__ import annotations

from clip.config import PipelineConfig
from clip.progress import Progress
from clip.result import StageResult
from clip.shards import stage
from pipelines._common import stage_main
from pipelines.events import emit_data_published


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    result = stage.run(cfg.shard, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, progress=progress)
    # Event-triggered retraining (flows/deploy.py): tell a configured Prefect API that a NEW data version is out
    # (never for a republished one, nor from a flow run that trains it itself: pipelines/events.py).
    result.metrics["data_published_event"] = emit_data_published(
        str(result.metrics.get("data_version", "")), cfg.shard.output,
        already_published=bool(result.metrics.get("already_published")))
    return result


def main(argv: list[str] | None = None) -> None:
    stage_main("shard", run, argv)


if __name__ == "__main__":
    main()
