"""A scripted week of the served deployments (flows/deploy.py), end to end on the real parts (issue 22): a real
`prefect server start` on 127.0.0.1 (tests/test_flow_queue.py's `queue_server`), the deployments served by
`python -m flows.deploy` as in production, every run created from a deployment or set off by its trigger, real
`dvc repro` in a temporary copy of this repository on tiny settings, and a SQLite MLflow store.

The week, in order:
1. weekly run 1 (`weekly-retrain`): every stage runs; the first registered version becomes `champion`;
2. a bad-input run (`clip-pipeline retrain --set promote.task=zero-shot`, a typo the typed config accepts and the
   promote stage refuses): the run fails at promote, without a retry, with the stage's own one-line error;
3. a new data version is published (params.yaml's shard size changed, `dvc repro shard`): `clip.data.published`
   starts the `on-new-data` run, whose training process is SIGKILLed once (CLIP_DEBUG_KILL_ONCE, armed only now):
   the task's retry trains, then export, evaluate and promote run, and the gate gives `champion` or `challenger`;
4. an overlap: a weekly run requested while the on-new-data run is going waits in Prefect's queue, then runs (and
   has nothing to do);
5. weekly run 2: nothing new, every stage skipped, the execution says so (`clip.noop`).
The bad-input run comes before the new data on purpose: DVC removes a stage's outputs before it runs it, so the
failed promote leaves promote.json gone, and a later run that includes promote redoes it (the new-data run here);
after the bad-input run nothing else could be a no-op.

Afterwards: one MLflow parent per flow run that executed, each with the stage runs it should have and the right
state (the bad-input one FAILED), nothing left RUNNING; the registry's aliases are what the recorded promote
decisions say; Prefect shows every run Completed except the bad-input one (Failed); `dvc status` is clean.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines._common import KILL_ONCE_ENV
from pipelines.params import apply_overrides
from tests.test_deployments import _stop, _wait
from tests.test_flow import TINY, repo_copy
from tests.test_flow_queue import queue_server  # noqa: F401 - the `prefect server start` fixture, used below
from tests.test_prefect_cli import prefect_api  # noqa: F401 - what queue_server starts

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
STAGES_TRACKED = ["evaluate", "export", "promote", "train"]  # the stages that open MLflow runs of their own
BAD_INPUT = "promote.task=zero-shot"  # a str the config takes; the results table has no row of that task
RUN_TIMEOUT_S = 420


@pytest.mark.heavy  # a server, a serve process, five tiny flow runs: 3.5-6 min on a busy 2-core box
def test_a_week_of_scheduled_triggered_killed_queued_and_refused_runs(request: pytest.FixtureRequest,
                                                                      mlflow_store: dict[str, str],
                                                                      tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env = request.getfixturevalue("queue_server")
    repo = repo_copy(tmp_path / "repo")
    apply_overrides(repo / "params.yaml", TINY + [
        "train.zeroshot_sets=[]", "evaluate.datasets=[synthetic-shapes]", "evaluate.synthetic_samples=24",
        "evaluate.linear_probe=false", "evaluate.plots=false", f"tracking.uri={mlflow_store['uri']}",
        f"tracking.artifact_location={mlflow_store['artifact_location']}"])
    kill_marker = tmp_path / "train-killed"
    kill_marker.touch()  # disarmed: the marker says "killed already"; removing it arms the kill
    served = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--repo", str(repo)], cwd=repo,
                              env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                                   KILL_ONCE_ENV: f"train:{kill_marker}"},
                              stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            week = _the_week(client, served, repo, env, kill_marker)
            _check_prefect(client, week)
    except BaseException:
        print((tmp_path / "serve.log").read_text()[-6000:])
        raise
    finally:
        _stop(served)
    _check_mlflow(mlflow_store["uri"], week)
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout
    assert "Data and pipelines are up to date." in status, status


def _the_week(client: Any, served: subprocess.Popen, repo: Path, env: dict[str, str],
              kill_marker: Path) -> dict[str, Any]:
    """Run the week (module docstring); returns the flow run ids by role and the two data versions."""
    from prefect.exceptions import ObjectNotFound

    def deployment_ids() -> dict[str, Any]:
        try:
            return {name: client.read_deployment_by_name(f"clip-pipeline/{name}").id
                    for name in ("weekly-retrain", "on-new-data")}
        except ObjectNotFound:
            return {}

    ids = _wait(deployment_ids, 180, "the served deployments", served)
    started = time.monotonic()

    def said(what: str) -> None:  # the week's progress, shown when the test fails
        print(f"{time.monotonic() - started:6.1f} s  {what}", flush=True)

    def state(run_id: Any) -> tuple[str, str]:
        run_state = client.read_flow_run(run_id).state
        return run_state.type.value, run_state.name

    def weekly(**parameters: Any) -> Any:
        return client.create_flow_run_from_deployment(ids["weekly-retrain"], parameters=parameters).id

    def finish(run_id: Any) -> str:
        def final() -> str | None:
            kind = state(run_id)[0]
            return kind if kind in FINAL else None

        return _wait(final, RUN_TIMEOUT_S, f"flow run {run_id} to finish", served)

    def data_version() -> str:
        return json.loads((repo / "reports" / "metrics" / "shard.json").read_text())["data_version"]

    week: dict[str, Any] = {"deployments": ids}
    week["weekly_1"] = weekly()
    assert finish(week["weekly_1"]) == "COMPLETED", state(week["weekly_1"])
    week["version_1"] = data_version()
    said("weekly run 1 completed")

    week["bad_input"] = weekly(overrides=[BAD_INPUT])
    assert finish(week["bad_input"]) == "FAILED"
    said("the bad-input run failed")

    # new data: other shard sizes, other shards, a new data version; published by DVC outside any flow run, so the
    # shard stage announces it
    kill_marker.unlink()  # the next training process SIGKILLs itself once
    apply_overrides(repo / "params.yaml", ["shard.samples_per_shard=40"])
    publish = subprocess.run([sys.executable, "-m", "dvc", "repro", "shard"], cwd=repo, env=env, capture_output=True,
                             text=True)
    assert publish.returncode == 0, publish.stdout[-3000:] + publish.stderr[-3000:]
    shard = json.loads((repo / "reports" / "metrics" / "shard.json").read_text())
    assert shard["data_published_event"] is True and shard["data_version"] != week["version_1"], shard
    week["version_2"] = shard["data_version"]
    said("new data published")

    def on_new_data_running() -> Any:
        runs = _deployment_runs(client, ids["on-new-data"])
        return [run.id for run in runs if run.state.type.value == "RUNNING"]

    [week["new_data"]] = _wait(on_new_data_running, 120, "the triggered on-new-data run to start", served)
    week["overlap"] = weekly()  # the schedule firing while the on-new-data run trains
    # queued: past its start time and not started (Late: the serve process runs one flow run at a time), or put
    # back by the server (AwaitingConcurrencySlot: the deployment's concurrency limit)
    queued = {("SCHEDULED", "Late"), ("SCHEDULED", "AwaitingConcurrencySlot")}
    _wait(lambda: state(week["overlap"]) in queued or state(week["new_data"])[0] != "RUNNING", 120,
          "the overlapping run to wait", served)
    assert state(week["new_data"])[0] == "RUNNING" and state(week["overlap"]) in queued, \
        f"the overlapping run did not wait for the running one: {state(week['overlap'])}"
    said("the overlapping run waits")
    assert finish(week["new_data"]) == "COMPLETED", state(week["new_data"])
    said("the on-new-data run completed")
    assert kill_marker.exists(), "the training process was never killed"
    assert finish(week["overlap"]) == "COMPLETED", state(week["overlap"])
    said("the overlapping run completed")

    week["weekly_2"] = weekly()
    assert finish(week["weekly_2"]) == "COMPLETED", state(week["weekly_2"])
    said("weekly run 2 completed")
    return week


def _deployment_runs(client: Any, *deployment_ids: Any) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(deployment_ids))))


def _attempts(client: Any, flow_run_id: Any, task_name: str) -> int:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sum(run.run_count for run in runs if run.name.startswith(task_name))


def _logs(client: Any, flow_run_id: Any) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def _check_prefect(client: Any, week: dict[str, Any]) -> None:
    roles = ("weekly_1", "bad_input", "new_data", "overlap", "weekly_2")
    runs = {run.id: run for run in _deployment_runs(client, *week["deployments"].values())
            if not run.auto_scheduled}  # the cron's own future runs aside
    assert set(runs) == {week[role] for role in roles}, "the week's runs, and no other (one training per version)"
    states = {role: runs[week[role]].state.type.value for role in roles}
    assert states == {**dict.fromkeys(roles, "COMPLETED"), "bad_input": "FAILED"}, states

    bad = runs[week["bad_input"]]
    assert "stage promote: error: promote: FormatError:" in bad.state.message and "zero-shot" in bad.state.message
    assert _attempts(client, bad.id, "promote") == 1, "bad input was retried"
    new_data = runs[week["new_data"]]
    assert new_data.deployment_id == week["deployments"]["on-new-data"]
    assert new_data.parameters["data_version"] == week["version_2"]
    assert _attempts(client, new_data.id, "train") == 2, "the killed training was not retried exactly once"
    overlap = runs[week["overlap"]]
    assert overlap.start_time >= new_data.end_time, "the queued run started before the running one ended"
    said = _logs(client, week["weekly_2"])
    stages = ("collect", "dedup", "shard", "train", "export", "evaluate", "promote")
    assert all(f"{stage}: up to date, skipped" in said for stage in stages), said


def _check_mlflow(uri: str, week: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    every = client.search_runs([client.get_experiment_by_name("clip").experiment_id], max_results=1000)
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"], "a run was left RUNNING"
    parents = {r.data.tags.get("prefect_flow_run_id"): r for r in every
               if r.data.tags.get("kind") == "pipeline-execution"}
    roles = {"weekly_1", "bad_input", "new_data", "overlap", "weekly_2"}
    assert len(parents) == len(roles) == len([r for r in every if r.info.run_name == "pipeline"])
    assert set(parents) == {str(week[role]) for role in roles}, "one parent per flow run that executed"
    children: dict[str, list[Any]] = {}
    for run in every:
        if run.data.tags.get("kind") != "pipeline-execution":
            parent = run.data.tags.get("mlflow.parentRunId")
            assert parent in {p.info.run_id for p in parents.values()}, f"{run.info.run_name} has no parent"
            children.setdefault(parent, []).append(run)

    def tree(role: str) -> tuple[str, list[tuple[str, str, str | None]], dict[str, str]]:
        parent = parents[str(week[role])]
        kids = sorted((r.info.run_name, r.info.status, r.data.tags.get("data_version"))
                      for r in children.get(parent.info.run_id, []))
        return parent.info.status, kids, parent.data.tags

    for role, version in (("weekly_1", week["version_1"]), ("new_data", week["version_2"])):
        status, kids, tags = tree(role)
        assert status == "FINISHED" and tags["clip.noop"] == "false", (role, status, tags)
        assert kids == [(stage, "FINISHED", version) for stage in STAGES_TRACKED], (role, kids)
    status, kids, tags = tree("bad_input")
    assert (status, kids, tags["failed_stage"]) == ("FAILED", [], "promote"), (status, kids, tags)
    for role in ("overlap", "weekly_2"):
        status, kids, tags = tree(role)
        assert (status, kids, tags["clip.noop"]) == ("FINISHED", [], "true"), (role, status, kids, tags)
        assert not parents[str(week[role])].data.metrics, "a no-op execution copied earlier metrics"

    # the registry: the aliases are where the recorded decisions put them
    promotes = [next(r for r in children[parents[str(week[role])].info.run_id] if r.info.run_name == "promote")
                for role in ("weekly_1", "new_data")]
    name = promotes[0].data.tags["registered_model"]
    version_of = {mv.run_id: mv.version for mv in client.search_model_versions(f"name='{name}'")}
    assert len(version_of) == 2 and all(p.info.run_id in version_of for p in promotes), version_of
    first, second = promotes
    assert first.data.tags["decision"] == "champion" and first.data.tags["decision_reason"] == "no champion yet"
    decision, metrics = second.data.tags["decision"], second.data.metrics
    better = metrics["new_mean"] > metrics["champion_mean"] + float(second.data.params["promote.min_improvement"])
    assert decision == ("champion" if better else "challenger"), (decision, metrics)
    expected = {"champion": version_of[second.info.run_id]} if better else {
        "champion": version_of[first.info.run_id], "challenger": version_of[second.info.run_id]}
    assert client.get_registered_model(name).aliases == expected
