"""The team stack's containers (infra/docker) and Kubernetes parts (infra/k8s), checked without a daemon or cluster.

- compose.yaml: `docker-compose config` accepts it; every command a service of our image runs parses with the
  program's own parser (prefect's cyclopts app, mlflow's and dask's click commands, torchrun's argparse and our
  stage's config); every environment variable is one our code or the server reads; names and ports agree with
  infra/stack.yaml (the one table the local stack shares).
- prefect.yaml (docker and k8s): the deployments of flows/deploy.py, bound to the right work pool.
- k8s: core manifests and every embedded pod / service spec against the Kubernetes schemas kubernetes-validate
  ships; TrainJob and DaskCluster against their vendored CRD schemas (infra/k8s/schemas/); the work pool base job
  template through prefect's server-side check and prefect-kubernetes' own job configuration, then its Job.
Each validator has a test that plants an error in a copy and sees it reported.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "infra" / "docker"
K8S = REPO / "infra" / "k8s"
STACK = yaml.safe_load((REPO / "infra" / "stack.yaml").read_text())
PIPELINE_IMAGE = "clip-pipeline:stack"
# Services of other images, and why they are there; their commands are the images' own.
THIRD_PARTY = {"postgres": "MLflow's and Prefect's database", "minio": "the S3 API",
               "minio-buckets": "creates the stack's buckets with MinIO's client"}
# Variables only a server of another image reads (nothing in Python to check them against).
SERVER_ENV = {
    "POSTGRES_USER": "postgres image: the superuser it creates",
    "POSTGRES_PASSWORD": "postgres image: that user's password",
    "POSTGRES_DB": "postgres image: the database it creates (MLflow's)",
    "MINIO_ROOT_USER": "minio image: the root access key",
    "MINIO_ROOT_PASSWORD": "minio image: the root secret key",
    "MC_HOST_stack": "minio/mc: the alias `stack` (URL with keys) mc's commands use",
}
OUR_CODE = [p for d in ("clip", "pipelines", "flows") for p in (REPO / d).rglob("*.py")]
NEEDS_COMPOSE = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (Debian package docker-compose: apt-get install -y docker-compose)")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def pipeline_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == PIPELINE_IMAGE}


# ------------------------------------------------------------------------------------------------------------
# Parsing a command with the program's own parser


def parse_click(command: Any, args: list[str]) -> None:
    """Parse `args` with a click command, down through its groups; a bad option raises click's UsageError."""
    import click

    ctx = command.make_context(command.name or "cmd", list(args))
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    if isinstance(command, click.Group) and rest:
        _, sub, sub_args = command.resolve_command(ctx, rest)
        parse_click(sub, sub_args)


def parse_command(argv: list[str]) -> None:
    """Raise when `argv` is not a command of this project's image whose arguments parse."""
    program, args = argv[0], list(argv[1:])
    if program == "clip-pipeline":
        import typer

        from pipelines.cli import app
        parse_click(typer.main.get_command(app), args)
    elif program == "prefect":
        from prefect.cli._app import _app

        _app.parse_args(args, exit_on_error=False, print_error=False)
    elif program == "mlflow":
        from mlflow.cli import cli
        parse_click(cli, args)
    elif program == "dask":
        from distributed.cli import dask_scheduler, dask_worker

        commands = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}
        if not args or args[0] not in commands:
            raise ValueError(f"not a dask command this stack runs: {argv}")
        parse_click(commands[args[0]], args[1:])
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        from pipelines._common import parse_stage_args

        parsed = get_args_parser().parse_args(args)
        if not parsed.module or parsed.training_script != "pipelines.train":
            raise ValueError(f"torchrun must run `-m pipelines.train`: {argv}")
        parse_stage_args(parsed.training_script_args, "train")  # loads and checks the config (--set keys)
    else:
        raise ValueError(f"{program!r} is not a program of the pipeline image: {argv}")


def command_of(service: dict[str, Any]) -> list[str]:
    return [*service.get("entrypoint", []), *service.get("command", [])]


# ------------------------------------------------------------------------------------------------------------
# Environment variables


def known_variable(name: str) -> str | None:
    """Why `name` is read (by our code, a library or a server), or None when nothing reads it."""
    if name in SERVER_ENV:
        return SERVER_ENV[name]
    if any(name in path.read_text() for path in OUR_CODE):
        return "read by clip/, pipelines/ or flows/"
    if name.startswith("MLFLOW_"):
        import mlflow.environment_variables as mlflow_env
        from mlflow.cli import cli

        server_envvars = {p.envvar for p in cli.commands["server"].params if p.envvar}
        if name in server_envvars or isinstance(getattr(mlflow_env, name, None), mlflow_env._EnvironmentVariable):
            return "an MLflow setting"
    if name.startswith("PREFECT_"):
        from prefect.settings import Settings
        from prefect.settings.legacy import _get_valid_setting_names

        if name in _get_valid_setting_names(Settings):
            return "a Prefect setting"
    if name.startswith("AWS_"):
        from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
        from botocore.credentials import EnvProvider

        names = {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY, EnvProvider.TOKENS[0], "AWS_ENDPOINT_URL"}
        for spec in BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
            names.update([spec[1]] if isinstance(spec[1], str) else spec[1] or [])
        if name in names:
            return "read by botocore"
    return None


def unknown_variables(compose: dict[str, Any]) -> list[str]:
    return [f"{service}: {name}" for service, svc in compose["services"].items()
            for name in svc.get("environment", {}) if known_variable(name) is None]


# ------------------------------------------------------------------------------------------------------------
# Agreement with infra/stack.yaml


def stack_mismatches(compose: dict[str, Any], stack: dict[str, Any]) -> list[str]:
    """Every way compose.yaml differs from the names and ports of infra/stack.yaml."""
    wrong = []
    services = compose["services"]
    for name, spec in stack["services"].items():
        if name not in services:
            wrong.append(f"service {name} missing")
            continue
        published = {spec["ports"][key] for key in spec.get("published", [])}
        found = set()
        for entry in services[name].get("ports", []):
            host, port, container = str(entry).split(":")
            if host != "127.0.0.1" or port != container:
                wrong.append(f"{name}: {entry} is not bound to 127.0.0.1 at the same port")
            found.add(int(container))
        if found != published:
            wrong.append(f"{name}: publishes {sorted(found)}, stack.yaml says {sorted(published)}")
        if name != "postgres":  # postgres listens on its image's default, 5432
            args = " ".join(command_of(services[name]))
            wrong += [f"{name}: port {port} not in its command" for port in spec["ports"].values()
                      if f"{port}" not in args]
    published_elsewhere = [n for n, s in services.items() if s.get("ports") and n not in stack["services"]]
    wrong += [f"{n} publishes ports but is not in stack.yaml" for n in published_elsewhere]
    env = services["prefect-worker"]["environment"]
    wrong += [f"prefect-worker: {key}={env.get(key)!r}, stack.yaml says {value!r}"
              for key, value in stack["client_env"].items() if env.get(key) != value]
    overrides = dict(kv.split("=", 1) for kv in build_overrides(compose))
    if overrides.get("compute.dask_scheduler") != stack["dask_scheduler"]:
        wrong.append(f"image compute.dask_scheduler {overrides.get('compute.dask_scheduler')!r}")
    if overrides.get("tracking.uri") != stack["client_env"]["MLFLOW_TRACKING_URI"]:
        wrong.append(f"image tracking.uri {overrides.get('tracking.uri')!r}")
    worker = command_of(services["prefect-worker"])
    if worker[worker.index("--pool") + 1] != stack["prefect"]["work_pool"]:
        wrong.append(f"prefect-worker serves {worker[worker.index('--pool') + 1]!r}")
    buckets = command_of(services["minio-buckets"])
    wrong += [f"bucket {b} not created" for b in stack["buckets"].values() if f"stack/{b}" not in buckets]
    mlflow = command_of(services["mlflow"])
    destination = mlflow[mlflow.index("--artifacts-destination") + 1]
    if not destination.startswith(f"s3://{stack['buckets']['mlflow_artifacts']}/"):
        wrong.append(f"mlflow artifacts go to {destination}")
    if services["postgres"]["environment"]["POSTGRES_DB"] != stack["databases"]["mlflow"]:
        wrong.append("postgres: POSTGRES_DB is not the mlflow database")
    prefect_db = services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    if not prefect_db.endswith(f"/{stack['databases']['prefect']}"):
        wrong.append(f"prefect database {prefect_db}")
    workers = [n for n, s in services.items() if command_of(s)[:2] == ["dask", "worker"]]
    if len(workers) != stack["dask_workers"]:
        wrong.append(f"{len(workers)} dask workers, stack.yaml says {stack['dask_workers']}")
    return wrong


def build_overrides(compose: dict[str, Any]) -> list[str]:
    """The config keys compose bakes into the image's params.yaml (build arg PARAMS_OVERRIDES)."""
    return compose["x-pipeline-image"]["build"]["args"]["PARAMS_OVERRIDES"].split()


# ------------------------------------------------------------------------------------------------------------
# compose.yaml


def compose_config(compose: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess:
    """`docker-compose config` on `compose` (written to tmp_path) with infra/docker as the project directory and
    .env.example's placeholders as the variables."""
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(compose))
    return subprocess.run(["docker-compose", "--project-directory", str(DOCKER), "--env-file",
                           str(DOCKER / ".env.example"), "-f", str(path), "config", "-q"],
                          capture_output=True, text=True, timeout=120)


@NEEDS_COMPOSE
def test_compose_config_accepts_the_stack(tmp_path: Path) -> None:
    result = compose_config(load_compose(), tmp_path)
    assert result.returncode == 0, result.stderr


@NEEDS_COMPOSE
def test_compose_config_reports_a_wrong_field(tmp_path: Path) -> None:
    compose = load_compose()
    compose["services"]["mlflow"]["portz"] = compose["services"]["mlflow"].pop("ports")
    result = compose_config(compose, tmp_path)
    assert result.returncode != 0 and "portz" in result.stderr, result.stderr


def test_every_service_runs_a_command_that_parses() -> None:
    compose = load_compose()
    assert set(compose["services"]) - set(pipeline_services(compose)) == set(THIRD_PARTY)
    for service in pipeline_services(compose).values():
        parse_command(command_of(service))  # raises on a bad command, naming it


@pytest.mark.parametrize("service, bad", [
    ("prefect-worker", ["--pol", "clip-process"]),
    ("mlflow", ["--allowed-host", "mlflow:5000"]),
    ("dask-worker-1", ["--nworker", "2"]),
])
def test_a_command_whose_arguments_do_not_parse_is_reported(service: str, bad: list[str]) -> None:
    broken = load_compose()["services"][service]
    broken["command"] = [*broken["command"], *bad]
    with pytest.raises(Exception, match=bad[0]):
        parse_command(command_of(broken))


def test_every_environment_variable_is_read_by_something() -> None:
    assert unknown_variables(load_compose()) == []


def test_an_unknown_environment_variable_is_reported() -> None:
    compose = load_compose()
    compose["services"]["prefect-worker"]["environment"]["MLFLOW_TRAKING_URI"] = "http://mlflow:5000"
    compose["services"]["mlflow"]["environment"]["CLIP_NO_SUCH_SETTING"] = "1"
    assert unknown_variables(compose) == ["mlflow: CLIP_NO_SUCH_SETTING", "prefect-worker: MLFLOW_TRAKING_URI"]


def test_compose_agrees_with_the_stack_table() -> None:
    assert stack_mismatches(load_compose(), STACK) == []


def test_a_port_or_name_that_disagrees_with_the_stack_table_is_reported() -> None:
    compose = load_compose()
    compose["services"]["mlflow"]["ports"] = ["0.0.0.0:5001:5001"]
    compose["services"]["dask-scheduler"]["ports"].append("127.0.0.1:8786:8786")  # the scheduler is internal
    wrong = stack_mismatches(compose, STACK)
    assert any("0.0.0.0:5001:5001 is not bound to 127.0.0.1" in w for w in wrong), wrong
    assert any(w.startswith("dask-scheduler: publishes [8786, 8787]") for w in wrong), wrong


def test_the_image_params_load_and_mlflow_accepts_the_stack_hosts() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    from clip.config import load_config

    cfg = load_config(REPO / "params.yaml", build_overrides(load_compose()))
    assert cfg.compute.dask_scheduler == STACK["dask_scheduler"]
    mlflow = command_of(load_compose()["services"]["mlflow"])
    hosts = mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    port = STACK["services"]["mlflow"]["ports"]["http"]
    assert all(is_allowed_host_header(hosts, f"{h}:{port}") for h in ("mlflow", "localhost", "127.0.0.1"))


def test_a_bad_key_in_the_image_params_is_reported() -> None:
    from clip.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="compute.dask_schedular"):
        load_config(REPO / "params.yaml", [*build_overrides(load_compose()), "compute.dask_schedular=tcp://x:1"])


# ------------------------------------------------------------------------------------------------------------
# prefect.yaml: the deployments of flows/deploy.py on a work pool


def deployment_mismatches(prefect_yaml: dict[str, Any], pool: str) -> list[str]:
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    from flows.deploy import deployments

    expected = {d.name: d for d in deployments()}
    found = PrefectYamlModel.model_validate(prefect_yaml).deployments
    wrong = [] if {d.name for d in found} == set(expected) else [f"deployments {[d.name for d in found]}"]
    for d in found:
        want = expected.get(d.name)
        if want is None:
            continue
        if d.entrypoint != "flows/pipeline.py:pipeline":
            wrong.append(f"{d.name}: entrypoint {d.entrypoint}")
        if d.parameters != want.parameters:
            wrong.append(f"{d.name}: parameters {d.parameters} != {want.parameters}")
        crons = [s.schedule.cron for s in want.schedules or []]
        if [s.cron for s in d.schedules or []] != crons:
            wrong.append(f"{d.name}: schedules {d.schedules} != cron {crons}")
        triggers = _initialize_deployment_triggers(d.name, copy.deepcopy(d.triggers or []))
        if [(t.expect, t.parameters) for t in triggers] != [(t.expect, t.parameters) for t in want.triggers]:
            wrong.append(f"{d.name}: triggers differ from flows/deploy.py")
        if d.work_pool is None or d.work_pool.name != pool:
            wrong.append(f"{d.name}: work pool {d.work_pool}")
        limit = d.concurrency_limit
        queueing = (limit.limit, str(limit.collision_strategy).upper()) if limit is not None and not isinstance(
            limit, int) else (limit, None)
        wanted = (want.concurrency_limit, want.concurrency_options.collision_strategy.value
                  if want.concurrency_options else None)
        if queueing != wanted:
            wrong.append(f"{d.name}: concurrency {queueing} != {wanted} (flows/deploy.py queueing_options)")
    return wrong


@pytest.mark.parametrize("path, pool", [(DOCKER / "prefect.yaml", STACK["prefect"]["work_pool"]),
                                        (K8S / "prefect.yaml", STACK["prefect"]["kubernetes_work_pool"])])
def test_prefect_yaml_deploys_the_flows_deployments(path: Path, pool: str) -> None:
    assert deployment_mismatches(yaml.safe_load(path.read_text()), pool) == []


def test_a_prefect_yaml_that_differs_from_the_flows_deployments_is_reported() -> None:
    broken = yaml.safe_load((DOCKER / "prefect.yaml").read_text())
    broken["deployments"][0]["schedule"] = broken["deployments"][0].pop("schedules")[0]  # the wrong key
    broken["deployments"][1]["triggers"][0]["expect"] = ["clip.data.publish"]
    wrong = deployment_mismatches(broken, STACK["prefect"]["work_pool"])
    assert [w.split(":")[0] for w in wrong] == ["weekly-retrain", "on-new-data"], wrong


def test_a_prefect_yaml_without_the_queueing_limit_is_reported() -> None:
    broken = yaml.safe_load((DOCKER / "prefect.yaml").read_text())
    del broken["deployments"][0]["concurrency_limit"]  # a second weekly run would start beside the first
    wrong = deployment_mismatches(broken, STACK["prefect"]["work_pool"])
    assert len(wrong) == 1 and wrong[0].startswith("weekly-retrain: concurrency"), wrong


# ------------------------------------------------------------------------------------------------------------
# Kubernetes


def k8s_errors(resource: dict[str, Any]) -> list[str]:
    """Errors of one resource: core kinds against kubernetes-validate's schemas (strict: unknown fields are errors),
    TrainJob / DaskCluster against the vendored CRD schemas plus their embedded pod and service specs."""
    import kubernetes_validate

    def core(obj: dict[str, Any]) -> list[str]:
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as err:
            return [f"{obj['kind']} {'.'.join(map(str, err.path))}: {err.message}"]
        return []

    def pod(spec: dict[str, Any]) -> list[str]:
        return core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec})

    schemas = {"TrainJob": "trainjob.trainer.kubeflow.org_v1alpha1.yaml",
               "DaskCluster": "daskcluster.kubernetes.dask.org_v1.yaml"}
    if resource["kind"] not in schemas:
        return core(resource)
    schema = yaml.safe_load((K8S / "schemas" / schemas[resource["kind"]]).read_text())
    errors = [f"{resource['kind']} {'.'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(resource)]
    if errors:
        return errors
    spec = resource["spec"]
    if resource["kind"] == "TrainJob":
        trainer = spec["trainer"]
        container = {"name": "node", "image": trainer["image"], "command": trainer.get("command", []),
                     "args": trainer.get("args", []), "env": trainer.get("env", []),
                     "resources": trainer.get("resourcesPerNode", {})}
        return pod({"containers": [container]})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "check"}, "spec": spec["scheduler"]["service"]}
    return pod(spec["worker"]["spec"]) + pod(spec["scheduler"]["spec"]) + core(service)


def k8s_resources(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.mark.parametrize("name", ["base.yaml", "trainjob.yaml", "daskcluster.yaml"])
def test_kubernetes_manifests_are_valid(name: str) -> None:
    for resource in k8s_resources(name):
        assert k8s_errors(resource) == []


def test_trainjob_and_dask_commands_parse() -> None:
    (train,) = k8s_resources("trainjob.yaml")
    parse_command(train["spec"]["trainer"]["command"] + train["spec"]["trainer"]["args"])
    (dask,) = k8s_resources("daskcluster.yaml")
    for role in ("worker", "scheduler"):
        container = dask["spec"][role]["spec"]["containers"][0]
        parse_command(container["command"] + container["args"])


def test_a_trainjob_with_a_bad_key_or_config_is_reported() -> None:
    (train,) = k8s_resources("trainjob.yaml")
    wrong_field = copy.deepcopy(train)
    wrong_field["spec"]["trainer"]["numNode"] = wrong_field["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e for e in k8s_errors(wrong_field))
    wrong_env = copy.deepcopy(train)
    wrong_env["spec"]["trainer"]["env"][0]["valu"] = wrong_env["spec"]["trainer"]["env"][0].pop("value")
    assert any("valu" in e for e in k8s_errors(wrong_env))
    trainer = train["spec"]["trainer"]
    with pytest.raises(SystemExit):  # the stage's config check: exit 2 naming the key
        parse_command(trainer["command"] + trainer["args"] + ["--set", "train.batchsize=8"])


def test_a_daskcluster_with_a_bad_key_is_reported() -> None:
    (dask,) = k8s_resources("daskcluster.yaml")
    broken = copy.deepcopy(dask)
    broken["spec"]["workers"] = broken["spec"].pop("worker")
    assert any("workers" in e for e in k8s_errors(broken))
    broken = copy.deepcopy(dask)
    broken["spec"]["scheduler"]["spec"]["containers"][0]["portz"] = []
    assert any("portz" in e for e in k8s_errors(broken))


def rendered_job(template: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes Job prefect-kubernetes' worker would submit for a flow run, from the base job template."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    WorkPoolCreate(name=STACK["prefect"]["kubernetes_work_pool"], type="kubernetes", base_job_template=template)
    # A client that is never called (the template references no blocks or variables); without one, prefect
    # would start a temporary server to resolve them.
    client = PrefectClient("http://127.0.0.1:9/api")
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, {}, client=client))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="check-run"))
    return config.job_manifest


def load_job_template() -> dict[str, Any]:
    return json.loads((K8S / "prefect-base-job-template.json").read_text())


def test_the_base_job_template_renders_a_valid_job() -> None:
    job = rendered_job(load_job_template())
    assert k8s_errors(job) == []
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in container["env"]}["PREFECT_API_URL"].endswith(":4200/api")


def test_a_base_job_template_with_a_misplaced_field_or_an_undeclared_variable_is_reported() -> None:
    misplaced = load_job_template()
    misplaced["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["completions"] = 1
    assert any("completions" in e for e in k8s_errors(rendered_job(misplaced)))
    undeclared = load_job_template()
    undeclared["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(ValueError, match="deadline"):
        rendered_job(undeclared)
