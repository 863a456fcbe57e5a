"""One MLflow parent run per pipeline execution (flows/pipeline.py), with every stage's run nested under it.

The flow calls `start_execution` before the first stage and exports the run id (PARENT_RUN_ENV) and its Prefect
flow run id (FLOW_RUN_ENV) to the stage processes that `dvc repro` starts; each stage's runs then carry
`mlflow.parentRunId` and the lineage tags (pipelines._common.with_lineage). `finish_execution` ends it FINISHED or
FAILED. What the record says is what this execution did:
- the metrics of the stages that ran in it are copied onto the parent as `<stage>.<metric>` (so the MLflow UI's
  compare view lines executions up, per-dataset evaluation figures included); a stage DVC skipped as up to date
  contributes none (its metrics file is an earlier execution's), only its `stage.<name>` = skipped tag;
- an execution in which every stage was skipped says so: NOOP_TAG = "true", no metrics;
- every run (clip.tracking) carries its owner process (host, pid): a parent whose flow process was killed stays
  RUNNING, so `start_execution` first ends FAILED each RUNNING run of this host whose process is gone (with a tag
  saying why), before it opens its own parent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clip.config import PipelineConfig, TrackingConfig, load_config
from clip.tracking import Tracker, is_uri
from pipelines._common import FLOW_RUN_ENV, PARENT_RUN_ENV, STAGES, params_hash, read_checkout_metrics

__all__ = ["FLOW_RUN_ENV", "NOOP_TAG", "PARENT_RUN_ENV", "finish_execution", "start_execution"]

NOOP_TAG = "clip.noop"  # "true": every stage was up to date; the execution changed nothing and measured nothing


def _in_repo(cfg: TrackingConfig, repo: Path) -> TrackingConfig:
    """Relative store locations resolved against the checkout (the stages run with it as their cwd)."""
    uri, artifacts = cfg.uri, cfg.artifact_location
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(repo / uri[len("sqlite:///"):])
    if not is_uri(artifacts) and not Path(artifacts).is_absolute():
        artifacts = str(repo / artifacts)
    return cfg.model_copy(update={"uri": uri, "artifact_location": artifacts})


def start_execution(repo: Path, flow_run_id: str | None) -> tuple[Tracker, str | None]:
    """Open the parent run of this execution (None when tracking is off); tags: flow run id, params hash. Runs
    left RUNNING by a process of this host that died are ended FAILED first (Tracker.fail_abandoned_runs)."""
    cfg: PipelineConfig = load_config(repo / "params.yaml")
    tracker = Tracker(_in_repo(cfg.tracking, repo))
    tracker.fail_abandoned_runs()
    hashes = {stage: params_hash(cfg, stage) for stage in STAGES}
    run_id = tracker.start("pipeline", params=cfg.model_dump(mode="json"), tags={
        "prefect_flow_run_id": flow_run_id, "kind": "pipeline-execution",
        **{f"params_hash.{stage}": value for stage, value in hashes.items()}})
    return tracker, run_id


def finish_execution(tracker: Tracker, repo: Path, outcomes: list[dict[str, Any]], failed: str | None) -> None:
    """The metrics of the stages that ran onto the parent run, which ends FAILED when a stage failed (named in a
    tag); an execution in which every stage was skipped is tagged NOOP_TAG and gets no metrics."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    # Skipped stages first: a stage that ran has the last word on the data version. A skipped stage still tells
    # which data version the checkout's outputs hold, but its figures are an earlier execution's.
    for outcome in sorted(outcomes, key=lambda o: not o.get("skipped")):
        stage, skipped = outcome["stage"], bool(outcome.get("skipped"))
        tags[f"stage.{stage}"] = "skipped" if skipped else "ran"
        data = read_checkout_metrics(repo, stage)
        if data is None:
            data = outcome.get("metrics", {})
        for key, value in data.items():
            if key == "data_version" and isinstance(value, str):
                tags["data_version"] = value
            elif not skipped and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                metrics[f"{stage}.{key}"] = float(value)
    ran = [outcome for outcome in outcomes if not outcome.get("skipped")]
    tags[NOOP_TAG] = str(bool(outcomes) and not ran and not failed).lower()
    if failed:
        tags["failed_stage"] = failed
    tracker.set_tags(tags)
    tracker.log_metrics(metrics)
    tracker.end("FAILED" if failed else "FINISHED")
