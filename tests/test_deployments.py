"""The deployments (flows/deploy.py) on a real `prefect server start` on 127.0.0.1 (the in-process test harness runs
triggers but not the scheduler): the weekly deployment's cron schedule produces scheduled runs, and publishing a
data version (the shard stage, which emits `clip.data.published`) starts the on-new-data deployment, whose flow
run trains on a temporary copy of this repository and completes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipelines.params import apply_overrides
from tests.support.servers import free_port
from tests.test_flow import TINY, repo_copy


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def _flow_runs(api: str, deployment: str) -> list[dict]:
    deployments = httpx.post(f"{api}/deployments/filter", json={
        "deployments": {"name": {"any_": [deployment]}}}).json()
    if not deployments:
        return []
    return httpx.post(f"{api}/flow_runs/filter", json={
        "flow_runs": {"deployment_id": {"any_": [deployments[0]["id"]]}}}).json()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.heavy
def test_schedule_and_data_published_trigger_on_a_prefect_server(tmp_path: Path) -> None:
    repo = repo_copy(tmp_path / "repo")
    apply_overrides(repo / "params.yaml", TINY + ["tracking.enabled=false"])
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "DO_NOT_TRACK": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=open(logs / "server.log", "w"),
                              stderr=subprocess.STDOUT)
    served = None
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 180, "the Prefect server", server)
        # the data stages first (no events: nothing serves yet), so the triggered run has data to train on
        subprocess.run([sys.executable, "-m", "dvc", "repro", "shard"], cwd=repo, env={
            **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}, check=True,
            capture_output=True)
        served = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--repo", str(repo),
                                   "--retrain-stages", "train"], env=env, cwd=repo,
                                  stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT)
        _wait(lambda: [r for r in _flow_runs(api, "weekly-retrain") if r["state_type"] == "SCHEDULED"],
              120, "a scheduled run of weekly-retrain", served)
        assert not _flow_runs(api, "on-new-data")

        # publish a new version through the shard stage (other shard sizes: other shards): it emits
        # clip.data.published, the trigger starts a run (republishing the same version would emit nothing)
        subprocess.run([sys.executable, "-m", "pipelines.shard", "--set", "shard.samples_per_shard=40"], cwd=repo,
                       env=env, check=True, capture_output=True)
        runs = _wait(lambda: [r for r in _flow_runs(api, "on-new-data") if r["state_type"] in
                              ("COMPLETED", "FAILED", "CRASHED")], 300, "the triggered run to finish", served)
        assert runs[0]["state_type"] == "COMPLETED", (logs / "serve.log").read_text()[-3000:]
        assert runs[0]["parameters"]["stages"] == ["train"] and len(runs[0]["parameters"]["data_version"]) == 64
        assert list((repo / "models" / "runs").glob("*/final.pt"))
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
