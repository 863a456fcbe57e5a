"""Promote: register the bundle as a new MLflow model version; `champion` moves to it only when it is better.

    result = run(cfg.promote, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)

Guarantees:
- The new version is registered whatever the decision (under `promote.model_name`, by default clip-<model>),
  as the pyfunc model of the bundle (clip.runtime.pyfunc: servable by `mlflow models serve` with no torch), with
  version tags `data_version`, `checkpoint_sha256`, `eval_task` and `eval_scores` (the per-dataset values of the
  compared task, JSON), so the next promotion can compare against it without re-evaluating anything.
- The decision compares means over the datasets BOTH versions were evaluated on (named in the run and in the
  metrics), never a mean over different sets. The new version takes `champion` when there is no champion yet or
  its mean beats the champion's by more than `promote.min_improvement`; otherwise it gets `challenger` and the
  champion stays. No common dataset: nothing can be compared, so the champion stays (`challenger`).
- Both means, the datasets and the decision are recorded on the MLflow run and in the stage's metrics; the
  version's description is the bundle's model card with the evaluation results filled in.
- A promotion already recorded is not registered twice: when a version of the same checkpoint
  (`checkpoint_sha256`) with the same task and scores exists (a promote stage run again after a failure further
  on, or on unchanged inputs), that version is reused (`reused: 1` in the metrics) and only the aliases are decided
  again; a version that already holds `champion` keeps it.
Inputs are checked before anything is registered: a bundle that fails its manifest check, or a results table
with no row of the compared task, is refused with a one-line error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from clip import storage as storage_lib
from clip.config import ComputeConfig, PromoteConfig, StorageConfig, TrackingConfig
from clip.formats.bundle import MODEL_CARD_NAME, bundle_file_uri, fill_model_card, verify_bundle
from clip.formats.errors import FormatError, MissingInputError
from clip.formats.results import ResultsTable
from clip.progress import Progress
from clip.promote.registry import Registry, log_bundle_version
from clip.result import StageResult
from clip.tracking import Tracker

PROGRESS_TASK = "promote"


@dataclass(kw_only=True)
class PromoteResult(StageResult):
    """metrics: version, promoted (0/1), new_mean, champion_mean, compared_datasets; outputs: model_uri."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    new_mean: float
    champion_mean: float | None
    datasets: tuple[str, ...]
    reason: str


def task_scores(table: ResultsTable, task: str) -> dict[str, float]:
    """{dataset: value} of the evaluated rows of `task` (skipped rows are not scores)."""
    return {row.dataset: float(row.value) for row in table.rows
            if row.task == task and row.status == "ok" and row.value is not None}


def decide(new: dict[str, float], champion: dict[str, float] | None, min_improvement: float) -> Decision:
    """The promotion rule (see the module docstring), as a pure function of the two score sets."""
    if champion is None:
        mean = sum(new.values()) / len(new)
        return Decision(True, mean, None, tuple(sorted(new)), "no champion yet")
    common = tuple(sorted(set(new) & set(champion)))
    if not common:
        mean = sum(new.values()) / len(new)
        return Decision(False, mean, None, (), "no dataset evaluated for both versions: the champion stays")
    new_mean = sum(new[d] for d in common) / len(common)
    old_mean = sum(champion[d] for d in common) / len(common)
    better = new_mean > old_mean + min_improvement
    reason = (f"mean over {len(common)} datasets {new_mean:.4f} vs champion {old_mean:.4f}"
              + ("" if better else f" (needs > {old_mean + min_improvement:.4f})"))
    return Decision(better, new_mean, old_mean, common, reason)


def read_results(uri: str, storage: StorageConfig) -> ResultsTable:
    try:
        raw = storage_lib.read_bytes(uri, storage)
    except FileNotFoundError:
        raise MissingInputError(f"no evaluation results at {uri} (run the evaluate stage)") from None
    return ResultsTable.from_json_bytes(raw, uri)


def model_card_with_results(bundle: str, table: ResultsTable, storage: StorageConfig) -> str:
    """The bundle's model card with its evaluation section filled: the registered version's description."""
    card = storage_lib.read_bytes(bundle_file_uri(bundle, MODEL_CARD_NAME, storage), storage).decode("utf-8")
    return fill_model_card(card, table.to_markdown())


def run(cfg: PromoteConfig, *, storage: StorageConfig, compute: ComputeConfig | None = None,
        tracking: TrackingConfig | None = None, progress: Progress | None = None) -> PromoteResult:
    del compute  # registration is I/O only
    if tracking is None or not tracking.enabled:
        raise ValueError("the promote stage registers the model in MLflow: tracking.enabled must be true")
    info = verify_bundle(cfg.bundle, storage).info
    table = read_results(cfg.results, storage)
    scores = task_scores(table, cfg.task)
    if not scores:
        raise FormatError(f"{cfg.results}: no evaluated row of task {cfg.task!r} to promote on (promote.task)")
    name = cfg.model_name or f"clip-{info.get('model', 'model')}"
    if progress is not None:
        progress(PROGRESS_TASK, 0, 3, name)

    registry = Registry(tracking)
    holder = registry.alias_version(name, cfg.alias)
    champion_scores = None
    if holder is not None:
        try:
            champion_scores = {k: float(v) for k, v in json.loads(holder[1].get("eval_scores", "{}")).items()}
        except (ValueError, AttributeError):
            champion_scores = {}
    tags = {"data_version": info.get("data_version"), "checkpoint_sha256": info.get("checkpoint_sha256"),
            "train_run_id": info.get("train_run_id"), "registered_model": name}
    version_tags = {**tags, "eval_task": cfg.task, "eval_scores": json.dumps(scores, sort_keys=True)}
    existing = registry.find_version(name, {k: str(v) for k, v in version_tags.items() if v is not None})
    if existing is not None and holder is not None and holder[0] == existing:
        decision = Decision(True, sum(scores.values()) / len(scores), None, tuple(sorted(scores)),
                            f"version {existing} (this checkpoint, these scores) already holds {cfg.alias}")
    else:
        decision = decide(scores, champion_scores, cfg.min_improvement)

    tracker = Tracker(tracking)
    with tracker.run("promote", params={"promote": cfg.model_dump(mode="json")}, tags=tags):
        version = existing or log_bundle_version(tracker, cfg.bundle, name, version_tags, storage)
        if progress is not None:
            progress(PROGRESS_TASK, 2, 3, f"{name} v{version}")
        alias = cfg.alias if decision.promote else cfg.challenger_alias
        registry.set_alias(name, alias, version)
        registry.describe(name, version, model_card_with_results(cfg.bundle, table, storage))
        metrics: dict[str, Any] = {"promoted": int(decision.promote), "new_mean": decision.new_mean,
                                   "compared_datasets": len(decision.datasets), "reused": int(existing is not None)}
        if decision.champion_mean is not None:
            metrics["champion_mean"] = decision.champion_mean
        tracker.log_metrics(metrics)
        tracker.set_tags({"decision": alias, "decision_reason": decision.reason,
                          "compared_datasets": ",".join(decision.datasets),
                          "previous_champion": holder[0] if holder else None})
    if progress is not None:
        progress(PROGRESS_TASK, 3, 3, f"{name} v{version} -> {alias}")
    return PromoteResult(
        metrics={**metrics, "version": int(version), "decision": alias, "reason": decision.reason,
                 "datasets": list(decision.datasets), "model_name": name,
                 "previous_champion": holder[0] if holder else None},
        outputs={"model_uri": f"models:/{name}/{version}", "alias_uri": f"models:/{name}@{alias}"},
    )
