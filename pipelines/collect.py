"""Collection stage: candidate (image, caption) pairs -> queries, matching, balancing -> raw webdataset shards.

Builds the query list, matches and balances candidate pairs, fetches or renders and validates their images,
and writes raw shards to `collect.output_dir` (default data/raw/) with candidates.parquet, query_counts.json,
stats.json and metrics.json.

    .venv/bin/clip-pipeline collect [--params params.yaml] [--set collect.synthetic.num_samples=1024]
    python -m pipelines.collect --set collect.source=table --set collect.table.paths='[cc3m.tsv]'

Restartable: run it again after an interruption and finished shards are kept (see clip.collect.stage).
"""

from __future__ import annotations

from typing import Any

from clip import storage
from clip.collect.stage import run_collect
from clip.config import PipelineConfig
from pipelines._common import stage_main, write_metrics


def run(cfg: PipelineConfig) -> dict[str, Any]:
    stats = run_collect(cfg.collect, cfg.compute, cfg.storage)
    metrics = {
        "collect_" + name: value for name, value in stats.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    metrics.update({f"collect_{status}": count for status, count in stats["by_status"].items()})
    output = cfg.collect.output_dir
    if storage.is_s3_uri(output):
        write_metrics("data/raw/metrics.json", metrics)  # metrics stay local beside the other stages' metrics
    else:
        write_metrics(storage.join(output, "metrics.json"), metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
