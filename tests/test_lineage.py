"""What the MLflow record and the export say about an execution is what it did (issue 22 items 4 and 5).

Real parts: SQLite MLflow stores with an explicit artifact folder, the real train / export / evaluate stage code on
the tiny model, data versions published with a real latest.json pointer, a real process killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from clip import storage
from clip.config import PipelineConfig, load_config
from clip.formats.bundle import MODEL_CARD_NAME, bundle_file_uri
from clip.formats.checkpoint import default_run_location
from clip.formats.manifest import write_pointer
from tests.support.shards import make_shards
from tests.support.train_config import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _client(uri: str):  # noqa: ANN202 - mlflow's client, imported late (slow import)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str, name: str | None = None) -> list:
    client = _client(uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    return [r for r in found if name is None or r.info.run_name == name]


def _tracking(store: dict[str, str], experiment: str, **extra: object) -> dict[str, object]:
    return {"tracking.enabled": True, "tracking.uri": store["uri"], "tracking.experiment": experiment,
            "tracking.artifact_location": store["artifact_location"], **extra}


def _repo(tmp_path: Path, store: dict[str, str]) -> Path:
    """A checkout as far as pipelines/lineage.py reads one: params.yaml with its tracking section."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"tracking": {
        "enabled": True, "uri": store["uri"], "artifact_location": store["artifact_location"],
        "experiment": "lineage"}}))
    return repo


# -- item 4: training segments ------------------------------------------------------------------------------


def test_each_training_invocation_is_its_own_run_linked_by_its_folder(tmp_path: Path,
                                                                     mlflow_store: dict[str, str]) -> None:
    """Trained to 1 epoch, then continued to 2 under another execution: two train runs, each with the epochs it
    ran with and nested under its own execution, linked by the run folder; the earlier one keeps its parent."""
    from pipelines.train import run

    make_shards(tmp_path / "shards", n=64, per_shard=32)
    client = _client(mlflow_store["uri"])
    experiment = client.create_experiment("segments", artifact_location=mlflow_store["artifact_location"])
    parents = [client.create_run(experiment, run_name="pipeline").info.run_id for _ in range(3)]
    out = tmp_path / "out"

    def train(epochs: int, parent: str):  # noqa: ANN202
        return run(load_config(None, tiny_overrides(str(tmp_path / "shards"), str(out), **{"train.epochs": epochs},
                                                    **_tracking(mlflow_store, "segments",
                                                                **{"tracking.parent_run_id": parent}))))

    first, second = train(1, parents[0]), train(2, parents[1])
    assert second.resumed_from_step == first.steps > 0 and second.steps == 2 * first.steps
    train(2, parents[2])  # finished already: trains nothing, and its own run says so
    runs = {r.data.tags["mlflow.parentRunId"]: r for r in _runs(mlflow_store["uri"], "segments", "train")}
    assert sorted(runs) == sorted(parents), "each execution has its own train child"
    one, two, again = (runs[parent] for parent in parents)
    assert [r.data.params["train.epochs"] for r in (one, two, again)] == ["1", "2", "2"]
    assert {r.data.tags["clip.train_run_folder"] for r in (one, two, again)} == {str(out)}
    assert one.data.tags["clip.resumed_from_step"] == "0" and "clip.resumed_from_run" not in one.data.tags
    assert two.data.tags["clip.resumed_from_step"] == str(first.steps)
    assert two.data.tags["clip.resumed_from_run"] == one.info.run_id
    assert again.data.tags["clip.nothing_to_train"] == "true" and not again.data.metrics
    assert all(r.info.status == "FINISHED" for r in (one, two, again))
    assert one.data.metrics["steps"] == first.steps and two.data.metrics["steps"] == second.steps


# -- item 4: the parent run of an execution --------------------------------------------------------------------


def test_a_parent_left_running_by_a_killed_execution_is_failed_by_the_next(tmp_path: Path,
                                                                          mlflow_store: dict[str, str]) -> None:
    from pipelines.lineage import finish_execution, start_execution

    repo = _repo(tmp_path, mlflow_store)
    killed = subprocess.run(  # an execution whose process is killed right after opening its parent run
        [sys.executable, "-c", "import os, signal, sys; from pathlib import Path; "
                               "from pipelines.lineage import start_execution; "
                               "start_execution(Path(sys.argv[1]), 'killed'); os.kill(os.getpid(), signal.SIGKILL)",
         str(repo)], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [orphan] = _runs(mlflow_store["uri"], "lineage")
    assert orphan.info.status == "RUNNING"

    live_tracker, live = start_execution(repo, "live")  # this process: alive, so never touched
    next_tracker, following = start_execution(repo, "next")
    client = _client(mlflow_store["uri"])
    orphan = client.get_run(orphan.info.run_id)
    assert orphan.info.status == "FAILED"
    assert f"process {orphan.data.tags['clip.pid']} " in orphan.data.tags["clip.failed_reason"]
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(live).data.tags["clip.pid"] == str(os.getpid())
    for tracker in (live_tracker, next_tracker):
        finish_execution(tracker, repo, [], None)
    assert client.get_run(following).info.status == client.get_run(live).info.status == "FINISHED"


def test_an_execution_that_skips_every_stage_says_so_and_copies_no_metrics(tmp_path: Path,
                                                                          mlflow_store: dict[str, str]) -> None:
    from pipelines.lineage import finish_execution, start_execution

    repo = _repo(tmp_path, mlflow_store)
    version = "ab" * 32
    earlier = {"train": {"steps": 12, "final_loss": 0.5, "data_version": version},
               "promote": {"decision": "champion", "version": 3, "reason": "better"}}
    (repo / "reports" / "metrics").mkdir(parents=True)
    for stage, metrics in earlier.items():  # what an earlier execution left
        (repo / "reports" / "metrics" / f"{stage}.json").write_text(json.dumps(metrics))
    skipped = [{"stage": stage, "skipped": True, "metrics": metrics} for stage, metrics in earlier.items()]
    tracker, noop = start_execution(repo, None)
    finish_execution(tracker, repo, skipped, None)
    tracker, ran = start_execution(repo, None)
    finish_execution(tracker, repo, [{**skipped[0], "skipped": False}, skipped[1]], None)

    client = _client(mlflow_store["uri"])
    noop_run, ran_run = client.get_run(noop), client.get_run(ran)
    assert noop_run.data.metrics == {} and noop_run.data.tags["clip.noop"] == "true"
    assert noop_run.data.tags["stage.train"] == noop_run.data.tags["stage.promote"] == "skipped"
    assert noop_run.data.tags["data_version"] == version  # what the checkout's outputs hold, still said
    assert ran_run.data.metrics == {"train.steps": 12.0, "train.final_loss": 0.5}  # the skipped promote: none
    assert ran_run.data.tags["clip.noop"] == "false"


def test_the_end_summary_does_not_repeat_an_earlier_promote_decision(tmp_path: Path) -> None:
    from flows.pipeline import summary

    (tmp_path / "params.yaml").write_text("tracking:\n  enabled: false\n")
    earlier = {"model_name": "clip-tiny-vit", "version": 3, "decision": "champion", "reason": "better"}
    said = summary([{"stage": "promote", "skipped": True, "metrics": earlier}], tmp_path)
    assert "decision:         skipped: nothing changed" in said and "champion" not in said
    said = summary([{"stage": "promote", "skipped": False, "metrics": earlier}], tmp_path)
    assert "decision:         clip-tiny-vit v3 -> champion (better)" in said


# -- item 5: the run of the data version asked about --------------------------------------------------------


@dataclass
class TwoVersions:
    root: Path
    shards: Path
    store: dict[str, str]
    older: str  # the data version latest.json names (moved back to it)
    newer: str  # trained last: its final.pt is the newest file

    def run_folder(self, version: str) -> Path:
        return self.root / default_run_location("tiny-vit", version)

    def cfg(self, **extra: object) -> PipelineConfig:
        overrides = {**_tracking(self.store, "versions"), "export.runs_dir": str(self.root / "models" / "runs"),
                     **extra}
        return load_config(None, tiny_overrides(str(self.shards), "null", **overrides))


def _publish(shards: Path, seed: int) -> str:
    """A new data version folder under `shards` (real shards and manifest), and latest.json moved to it."""
    staging = shards.parent / f"staging-{seed}"
    make_shards(staging, n=64, per_shard=32, seed=seed)
    version = json.loads((staging / "manifest.json").read_text())["data_version"]
    staging.rename(shards / version)
    write_pointer(str(shards), version, f"2026-01-0{seed + 1}T00:00:00Z")
    return version


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoVersions]:
    """Two data versions, each trained with the default run folder rule (train.output null, from the folder
    `root`); then latest.json moved back to the first, and the second's final.pt made the newest file."""
    from pipelines.train import run

    root = tmp_path_factory.mktemp("versions")
    (root / "mlartifacts").mkdir()
    shards = root / "data" / "shards"
    shards.mkdir(parents=True)
    store = {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts")}
    versions = TwoVersions(root, shards, store, older="", newer="")
    with contextlib.chdir(root):  # the default run folder, models/runs/<model>-<version[:12]>, is relative
        versions.older = _publish(shards, seed=0)
        run(versions.cfg())
        versions.newer = _publish(shards, seed=1)
        run(versions.cfg())
    write_pointer(str(shards), versions.older, "2026-01-03T00:00:00Z")
    newer_final = versions.run_folder(versions.newer) / "final.pt"
    later = (versions.run_folder(versions.older) / "final.pt").stat().st_mtime + 100
    os.utime(newer_final, (later, later))
    yield versions


def test_export_takes_the_run_of_the_data_version_latest_json_names(two_versions: TwoVersions) -> None:
    from pipelines.export import run

    bundle = two_versions.root / "bundle"
    result = run(two_versions.cfg(**{"export.output_dir": str(bundle)}))
    older_run = two_versions.run_folder(two_versions.older)
    assert result.info["data_version"] == two_versions.older, "exported the newest file's run"
    assert result.info["checkpoint"] == str(older_run / "final.pt")
    [train_run] = [r for r in _runs(two_versions.store["uri"], "versions", "train")
                   if r.data.tags["data_version"] == two_versions.older]
    card = storage.read_bytes(bundle_file_uri(str(bundle), MODEL_CARD_NAME)).decode()
    assert f"| training data version | `{two_versions.older}` |" in card
    assert f"| training run id (MLflow) | `{train_run.info.run_id}` |" in card
    assert f"| checkpoint | `{older_run / 'final.pt'}` |" in card
    assert two_versions.newer[:12] not in card
    [export_run] = _runs(two_versions.store["uri"], "versions", "export")
    assert export_run.data.tags["data_version"] == two_versions.older

    # a run folder that holds another version's checkpoint (train.output fixed) is refused, naming both
    with pytest.raises(ValueError, match=f"trained on data version {two_versions.newer[:12]}, not on "
                                         f"{two_versions.older[:12]}"):
        run(two_versions.cfg(**{"export.output_dir": str(bundle),
                                "train.output": str(two_versions.run_folder(two_versions.newer))}))


def test_evaluate_runs_carry_the_data_version_of_the_model(two_versions: TwoVersions) -> None:
    """Of a checkpoint (a run folder: its final.pt) and of an export bundle (its manifest's data version)."""
    from pipelines import evaluate, export

    small = {"evaluate.datasets": "[synthetic-shapes]", "evaluate.synthetic_samples": 24, "evaluate.plots": False,
             "evaluate.linear_probe": False, "evaluate.cache_dir": "null", "evaluate.workers": 1}
    newer_run, bundle = two_versions.run_folder(two_versions.newer), two_versions.root / "eval-bundle"
    export.run(two_versions.cfg(**{"export.checkpoint": str(two_versions.run_folder(two_versions.older)),
                                   "export.output_dir": str(bundle), "tracking.enabled": False}))
    for model, version in ((newer_run, two_versions.newer), (bundle, two_versions.older)):
        key = "evaluate.checkpoint" if model == newer_run else "evaluate.bundle"
        result = evaluate.run(two_versions.cfg(**small, **{key: str(model), "tracking.experiment": model.name,
                                                           "evaluate.output_dir": str(model) + "-eval"}))
        assert result.metrics["data_version"] == version
        [evaluated] = _runs(two_versions.store["uri"], model.name, "evaluate")
        assert evaluated.data.tags["data_version"] == version, model
