"""The local team stack (infra/local/stack.py, `make stack` / `make stack-down`) and how the pipeline finds a stack
through environment variables only (MLFLOW_TRACKING_URI, DASK_SCHEDULER_ADDRESS as config defaults).

The heavy test brings the real stack up (PostgreSQL, moto's S3 server, MLflow with basic auth, Prefect with API auth,
its worker and deployments, Dask), runs the weekly-retrain deployment through the Prefect API on a copy of this
repository, publishes new data, and follows the event-triggered run to the promotion gate. It skips, naming the
package, where PostgreSQL or a Python package of the stack extra is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from clip.config import ConfigError, load_config
from pipelines.params import apply_overrides
from tests.test_flow import TINY, repo_copy
from tests.test_infra_manifests import STACK, deployment_mismatches, known_variable, parse_command

REPO = Path(__file__).resolve().parents[1]


def _launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clip_local_stack", REPO / "infra" / "local" / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stack = _launcher()


# ------------------------------------------------------------------------------------------------------------
# The pipeline reads the stack from the environment


def test_tracking_uri_and_dask_address_default_from_the_environment(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  experiment: team\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    local = load_config(params)
    assert (local.tracking.uri, local.tracking.artifact_location) == ("sqlite:///mlflow.db", "mlartifacts")
    assert local.compute.dask_scheduler is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    served = load_config(params)
    # artifacts go to the server's own store (its S3 bucket), not to a folder on this machine
    assert (served.tracking.uri, served.tracking.artifact_location) == ("http://127.0.0.1:5000",
                                                                         "mlflow-artifacts:/team")
    assert served.compute.dask_scheduler == "tcp://127.0.0.1:8786"
    # what params.yaml or --set names still wins
    chosen = load_config(params, ["tracking.uri=sqlite:///other.db", "compute.dask_scheduler=tcp://10.0.0.1:1"])
    assert (chosen.tracking.uri, chosen.tracking.artifact_location) == ("sqlite:///other.db", "mlartifacts")
    assert chosen.compute.dask_scheduler == "tcp://10.0.0.1:1"
    # the repository's params.yaml leaves both to the environment
    assert load_config(REPO / "params.yaml").tracking.uri == "http://127.0.0.1:5000"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:hunter2@127.0.0.1:5000")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: must not carry credentials") as refused:
        load_config(params)
    assert "hunter2" not in str(refused.value)


def test_a_server_artifact_location_stays_a_uri(tmp_path: Path) -> None:
    """mlflow-artifacts:/<experiment> (one slash) is the server's bucket, not a folder named so in the checkout."""
    from clip.config import TrackingConfig
    from clip.tracking import artifact_location_uri
    from pipelines.lineage import _in_repo

    served = TrackingConfig(uri="http://127.0.0.1:5000", experiment="team")
    assert artifact_location_uri(served.artifact_location) == "mlflow-artifacts:/team"
    assert _in_repo(served, tmp_path).artifact_location == "mlflow-artifacts:/team"
    local = TrackingConfig(uri="sqlite:///m.db", artifact_location="mlartifacts")
    assert _in_repo(local, tmp_path).artifact_location == str(tmp_path / "mlartifacts")
    assert artifact_location_uri(str(tmp_path / "a")) == (tmp_path / "a").as_uri()


# ------------------------------------------------------------------------------------------------------------
# The launcher, without starting anything


def test_local_prefect_yaml_deploys_the_flows_deployments_on_the_stack_pool() -> None:
    local = yaml.safe_load((REPO / "infra" / "local" / "prefect.yaml").read_text())
    assert deployment_mismatches(local, STACK["prefect"]["work_pool"]) == []
    assert "pull" not in local  # `prefect deploy` then records the checkout it runs in


def test_missing_packages_are_named_with_their_install_command(tmp_path: Path) -> None:
    problems = stack.missing_packages(pg_root=tmp_path, bindir=tmp_path)
    assert problems[0] == "postgresql is not installed: apt-get install -y postgresql"
    assert any(line.startswith("moto[server] is not installed") and line.endswith(stack.INSTALL_STACK)
               for line in problems)
    (tmp_path / "15" / "bin").mkdir(parents=True)
    for program in ("pg_ctl", "initdb"):
        (tmp_path / "15" / "bin" / program).touch()
    assert stack.postgres_bindir(tmp_path) == tmp_path / "15" / "bin"
    assert not any("postgresql" in line for line in stack.missing_packages(pg_root=tmp_path, bindir=tmp_path))


def test_every_server_command_parses_and_every_variable_is_read(tmp_path: Path) -> None:
    ports = dict.fromkeys(("postgres", "s3", "mlflow", "prefect", "dask", "dask_dashboard"), 1)
    secret = {key: "x" for key in stack.read_env_file(REPO / "infra" / "docker" / ".env.example")}
    commands = stack.server_commands(ports, secret, tmp_path)
    assert set(commands) == set(stack.ORDER) - {"postgres", "prefect-worker"}
    for name, (argv, env) in commands.items():
        if name != "s3":  # moto_server: no parser to ask
            parse_command([Path(argv[0]).name, *argv[1:]])
        assert [key for key in env if known_variable(key) is None] == [], name
    client = stack.client_env(ports, secret)
    assert set(STACK["client_env"]) <= set(client)
    assert [key for key in client if known_variable(key) is None] == []
    assert all("127.0.0.1" in value for key, value in client.items() if key.endswith(("_URI", "_URL", "ADDRESS")))


def test_stop_signals_only_the_process_it_started(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    proc, record = stack.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                               tmp_path)
    try:
        stack.stop("sleeper", {**record, "started": record["started"] + 1})  # same pid, another process
        assert proc.poll() is None and stack.alive(record)
        stack.stop("sleeper", record)
        assert proc.wait(timeout=10) != 0 and not stack.alive(record)
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------------------
# The whole stack


def _skip_without_the_stack() -> None:
    missing = stack.missing_packages()
    if missing:
        pytest.skip("the local stack cannot start here: " + "; ".join(missing))


@pytest.fixture
def stack_home() -> Iterator[Path]:
    """The stack's folder under /tmp: PostgreSQL runs as the postgres user, which cannot enter pytest's private
    tmp_path. Removed afterwards, after `make stack-down`."""
    home = Path(tempfile.mkdtemp(prefix="clip-stack-"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _wait(what: str, predicate: Any, timeout_s: float, on_timeout: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}\n{on_timeout()}")


class PrefectApi:
    def __init__(self, env: dict[str, str]) -> None:
        user, password = env["PREFECT_API_AUTH_STRING"].split(":", 1)
        self.client = httpx.Client(base_url=env["PREFECT_API_URL"] + "/", auth=(user, password), timeout=30)

    def deployment(self, name: str) -> dict[str, Any]:
        found = self.client.post("deployments/filter", json={"deployments": {"name": {"any_": [name]}}}).json()
        assert len(found) == 1, found
        return found[0]

    def runs(self, deployment: str) -> list[dict[str, Any]]:
        return self.client.post("flow_runs/filter", json={"flow_runs": {"deployment_id": {
            "any_": [self.deployment(deployment)["id"]]}}, "sort": "START_TIME_ASC"}).json()

    def finished(self, deployment: str, count: int) -> list[dict[str, Any]] | None:
        """The deployment's runs once `count` of them started and every started one ended (the cron schedule's
        future runs, SCHEDULED and never started, do not count)."""
        runs = [r for r in self.runs(deployment) if r["state_type"] != "SCHEDULED" or r["start_time"]]
        done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        return runs if len(runs) >= count and len(done) == len(runs) else None

    def logs(self, run: dict[str, Any]) -> str:
        logs = self.client.post("logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                     "sort": "TIMESTAMP_ASC"}).json()
        return "\n".join(entry["message"] for entry in logs)[-4000:]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def _listening_addresses(state: dict[str, Any]) -> set[str]:
    import psutil

    addresses = set()
    for record in state["processes"].values():
        root = psutil.Process(record["pid"])
        for proc in [root, *root.children(recursive=True)]:
            addresses |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    return addresses


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_make_stack_runs_both_deployments_to_the_promotion_gate(tmp_path: Path, stack_home: Path) -> None:
    _skip_without_the_stack()
    repo = repo_copy(tmp_path / "repo")
    apply_overrides(repo / "params.yaml", TINY)  # the tiny preset, for the scheduled and the triggered run alike
    make = ["make", "-s", "-C", str(REPO), f"STACK_HOME={stack_home}"]
    started = subprocess.run([*make, "stack", f"STACK_REPO={repo}"], capture_output=True, text=True, timeout=420)
    state = stack.read_state(stack_home)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert state is not None and set(state["processes"]) == set(stack.ORDER)
        for url in state["urls"].values():
            assert url in started.stdout  # each UI's loopback address is printed
        assert _listening_addresses(state) == {"127.0.0.1"}
        _run_the_scenario(repo, stack_home, state)
    finally:
        stopped = subprocess.run([*make, "stack-down"], capture_output=True, text=True, timeout=180)
        for name, record in (state or {}).get("processes", {}).items():
            stack.stop(name, record)  # whatever stack-down left (it failed): stopped all the same
    assert stopped.returncode == 0 and "stopped 8 processes" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not any(stack.alive(record) for record in state["processes"].values())
    assert (stack_home / "pg" / "data" / "PG_VERSION").exists()  # the data stays
    assert any((stack_home / "s3" / STACK["buckets"]["mlflow_artifacts"]).rglob("MLmodel"))


def _run_the_scenario(repo: Path, home: Path, state: dict[str, Any]) -> None:
    env = stack.read_env_file(home / "client.env")
    prefect = PrefectApi(env)
    mlflow_search = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    # Both servers refuse a request without credentials, and take one with them.
    assert httpx.get(mlflow_search, params={"max_results": 1}).status_code == 401
    assert httpx.post(f"{env['PREFECT_API_URL']}/deployments/filter", json={}).status_code == 401
    assert httpx.get(mlflow_search, params={"max_results": 1}, auth=(
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])).status_code == 200
    worker_log = home / "logs" / "prefect-worker.log"

    def explain(deployment: str) -> Any:
        return lambda: "\n".join(
            [f"--- {r['name']} {r['state_type']}\n{prefect.logs(r)}" for r in prefect.runs(deployment)]
            + ["--- worker log", _tail(worker_log)])

    # 1. weekly-retrain, run now through the API, with a DVC push to the stack's bucket as its parameter
    weekly = prefect.deployment("weekly-retrain")
    created = prefect.client.post(f"deployments/{weekly['id']}/create_flow_run", json={"parameters": {"push": "s3"}})
    assert created.status_code == 201, created.text
    runs = _wait("the weekly-retrain run", lambda: prefect.finished("weekly-retrain", 1), 420, explain("weekly-retrain"))
    assert [r["state_type"] for r in runs] == ["COMPLETED"], explain("weekly-retrain")()
    first_version = json.loads((repo / "reports" / "metrics" / "shard.json").read_text())["data_version"]
    assert prefect.runs("on-new-data") == []  # the weekly run trained the version it published: no event

    # The data stages ran on the stack's Dask scheduler; the outputs went to the buckets, the metadata to PostgreSQL.
    assert "Receive client connection" in _tail(home / "logs" / "dask-scheduler.log", 100_000)
    in_sync = subprocess.run([sys.executable, "-m", "dvc", "status", "-c", "-r", "s3"], cwd=repo, capture_output=True,
                             text=True, env={**os.environ, **env}, timeout=120)
    assert "in sync" in in_sync.stdout, in_sync.stdout + in_sync.stderr  # shards, checkpoints, bundle: clip-dvc
    s3 = stack._s3(env)
    artifacts = s3.list_objects_v2(Bucket=STACK["buckets"]["mlflow_artifacts"]).get("Contents", [])
    assert any(item["Key"].endswith("/MLmodel") for item in artifacts)
    run_names = {name for (name,) in _sql(state, "mlflow", "SELECT name FROM runs")}
    assert {"pipeline", "train", "evaluate", "promote"} <= run_names, run_names  # the execution, its stages
    assert _sql(state, "mlflow", "SELECT name FROM registered_models") == [(f"clip-{cfg_model(repo)}",)]
    assert _sql(state, "prefect", "SELECT state_type FROM flow_run WHERE state_type <> 'SCHEDULED'") == [
        ("COMPLETED",)]

    # 2. new data, published as a data engineer would: the shard stage with the stack's variables
    apply_overrides(repo / "params.yaml", ["collect.seed=1"])
    published = subprocess.run([sys.executable, "-m", "dvc", "repro", "shard"], cwd=repo, capture_output=True,
                               text=True, timeout=300, env={**os.environ, **env, "PATH": os.pathsep.join(
                                   [str(Path(sys.executable).parent), os.environ["PATH"]])})
    assert published.returncode == 0, published.stdout[-3000:] + published.stderr[-3000:]
    new_version = json.loads((repo / "reports" / "metrics" / "shard.json").read_text())["data_version"]
    assert new_version != first_version
    runs = _wait("the on-new-data run of the new data", lambda: prefect.finished("on-new-data", 1), 360,
                 explain("on-new-data"))
    assert [(r["state_type"], r["parameters"]["data_version"]) for r in runs] == [("COMPLETED", new_version)], \
        explain("on-new-data")()
    assert (repo / "models" / "runs" / f"{cfg_model(repo)}-{new_version[:12]}" / "final.pt").exists()
    _check_the_gate(repo, env)


def cfg_model(repo: Path) -> str:
    return load_config(repo / "params.yaml").train.model


def _sql(state: dict[str, Any], database: str, query: str) -> list[tuple]:
    import psycopg2

    secret = stack.read_env_file(Path(state["home"]) / "secrets.env")
    conn = psycopg2.connect(host="127.0.0.1", port=state["ports"]["postgres"], user=stack.DB_USER,
                            password=secret["POSTGRES_PASSWORD"], dbname=database)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


def _check_the_gate(repo: Path, env: dict[str, str]) -> None:
    """The event-triggered run registered version 2; `champion` is on it exactly when the gate's rule says so."""
    from mlflow import MlflowClient

    from clip.promote.stage import decide

    cfg = load_config(repo / "params.yaml")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # MLflow's client reads its credentials from the environment only
    try:
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        name = f"clip-{cfg.train.model}"
        versions = {v.version: v for v in client.search_model_versions(f"name='{name}'")}
        assert sorted(versions) == ["1", "2"], sorted(versions)
        scores = {number: json.loads(v.tags["eval_scores"]) for number, v in versions.items()}
        decision = decide(scores["2"], scores["1"], cfg.promote.min_improvement)
        champion = client.get_model_version_by_alias(name, cfg.promote.alias).version
        assert champion == ("2" if decision.promote else "1"), decision
        metrics = json.loads((repo / "reports" / "metrics" / "promote.json").read_text())
        alias = cfg.promote.alias if decision.promote else cfg.promote.challenger_alias
        assert (metrics["version"], metrics["decision"]) == (2, alias), metrics
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
