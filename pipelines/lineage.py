"""One MLflow parent run per pipeline execution (flows/pipeline.py), with every stage's run nested under it.

The flow calls `start_execution` before the first stage and exports the run id (PARENT_RUN_ENV) and its Prefect
flow run id (FLOW_RUN_ENV) to the stage processes that `dvc repro` starts; each stage's runs then carry
`mlflow.parentRunId` and the lineage tags (pipelines._common.with_lineage). `finish_execution` copies each stage's
numeric metrics onto the parent run as `<stage>.<metric>` (so the MLflow UI's compare view lines executions up,
per-dataset evaluation figures included) and ends it FINISHED or FAILED.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from clip.config import PipelineConfig, TrackingConfig, load_config
from clip.formats.metrics import metrics_uri
from clip.tracking import Tracker
from pipelines._common import FLOW_RUN_ENV, PARENT_RUN_ENV, params_hash

__all__ = ["FLOW_RUN_ENV", "PARENT_RUN_ENV", "finish_execution", "start_execution"]


def _in_repo(cfg: TrackingConfig, repo: Path) -> TrackingConfig:
    """Relative store locations resolved against the checkout (the stages run with it as their cwd)."""
    uri, artifacts = cfg.uri, cfg.artifact_location
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(repo / uri[len("sqlite:///"):])
    if "://" not in artifacts and not Path(artifacts).is_absolute():
        artifacts = str(repo / artifacts)
    return cfg.model_copy(update={"uri": uri, "artifact_location": artifacts})


def start_execution(repo: Path, flow_run_id: str | None) -> tuple[Tracker, str | None]:
    """Open the parent run of this execution (None when tracking is off); tags: flow run id, params hash."""
    cfg: PipelineConfig = load_config(repo / "params.yaml")
    tracker = Tracker(_in_repo(cfg.tracking, repo))
    hashes = {stage: params_hash(cfg, stage) for stage in
              ("collect", "dedup", "shard", "train", "export", "evaluate", "promote")}
    run_id = tracker.start("pipeline", params=cfg.model_dump(mode="json"), tags={
        "prefect_flow_run_id": flow_run_id, "kind": "pipeline-execution",
        **{f"params_hash.{stage}": value for stage, value in hashes.items()}})
    return tracker, run_id


def finish_execution(tracker: Tracker, repo: Path, outcomes: list[dict[str, Any]], failed: str | None) -> None:
    """Stage metrics onto the parent run, which ends FAILED when a stage failed (named in a tag)."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for outcome in outcomes:
        stage = outcome["stage"]
        tags[f"stage.{stage}"] = "skipped" if outcome.get("skipped") else "ran"
        path = repo / metrics_uri(stage)
        data = json.loads(path.read_text()) if path.exists() else outcome.get("metrics", {})
        for key, value in data.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"{stage}.{key}"] = float(value)
            elif key == "data_version" and isinstance(value, str):
                tags["data_version"] = value
    if failed:
        tags["failed_stage"] = failed
    tracker.set_tags(tags)
    tracker.log_metrics(metrics)
    tracker.end("FAILED" if failed else "FINISHED")
