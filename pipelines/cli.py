"""The `clip-pipeline` command: one entry point for every stage.

    clip-pipeline --help
    clip-pipeline config show [--params params.yaml] [--set train.batch_size=64] [--explain]
    clip-pipeline collect|dedup|shard|train|export|evaluate|promote [--params ...] [--set key=value ...]
    clip-pipeline train --nproc-per-node 8          # torchrun on this machine
    clip-pipeline all                               # every stage in order, in this process (no DVC, no Prefect)
    clip-pipeline data list | data prune [--keep N] [--dry-run]   # data versions under shard.output
    clip-pipeline predict --bundle models/bundle a.jpg b.png --labels "cat,dog"   # zero-shot, no torch
    clip-pipeline index --bundle models/bundle ~/Photos --out photos.index       # search your photos, no torch
    clip-pipeline search photos.index "a red car at night" --top 10
    clip-pipeline run [--set train.epochs=8 [--save]] [--stages ...]   # the Prefect flow over the DVC stages
    clip-pipeline serve [--cron ...] [--timezone Europe/Berlin] [--paused] [--stages train,export]
    clip-pipeline retrain [--set train.epochs=8]    # a weekly-retrain run now; --set for that run only
    clip-pipeline serve-model models:/clip-tiny-vit@champion --port 5000
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from clip.config import DEFAULT_PARAMS, PipelineConfig, dump_config, explain_config
from clip.result import StageResult
from clip.storage.redact import format_exception_redacted
from pipelines._common import (
    METRICS_HELP,
    STAGES,
    execute_stage,
    exit_on_user_error,
    load_stage_config,
    prepare_process,
    print_outputs,
)
from pipelines.predict import predict as predict_command
from pipelines.search import index as index_command
from pipelines.search import search as search_command

STAGE_HELP = {
    "collect": "Build queries, match and balance candidate pairs, fetch and validate images -> data/raw/.",
    "dedup": "Remove exact and near duplicates and evaluation-set overlap -> data/dedup/.",
    "shard": "Write shuffled webdataset shards + manifest, publish to local disk or S3 -> data/shards/.",
    "train": "Contrastive training (torchrun, one CPU to many GPU nodes) -> models/runs/<model>-<data version>/.",
    "export": "ONNX encoders + tokenizer + preprocessing, checked against the checkpoint -> models/bundle/.",
    "evaluate": "Zero-shot and linear-probe evaluation -> reports/eval/.",
    "promote": "Register the model in MLflow; move the champion alias only if it is better.",
}

console = Console(stderr=True)
app = typer.Typer(help="clip-pipeline: from raw web (image, text) pairs to an evaluated CLIP model.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Data versions published to shard.output: list them, prune old ones.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[str | None, typer.Option(
    "--params", help="params file [default: params.yaml in the working folder; built-in defaults without one]")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a value: --set train.batch_size=64")]
MetricsOpt = Annotated[str | None, typer.Option("--metrics", help=METRICS_HELP)]


def _load(params: str | None, overrides: list[str] | None) -> PipelineConfig:
    """The typed config; a config error is printed and exits with status 2 (pipelines._common)."""
    return load_stage_config(params, overrides or [])


def run_stage(stage: str, cfg: PipelineConfig, metrics: str | None = None) -> StageResult:
    """Run one stage through `execute_stage` (metrics: `metrics`, or pipelines._common.metrics_location's
    default). Bad input exits with status 1 and one line (pipelines._common). `train` is no exception: it
    launches torchrun itself when `compute` asks for several processes."""
    console.rule(f"[bold]{stage}")
    start = time.monotonic()
    with exit_on_user_error(stage):
        result = execute_stage(stage, cfg, metrics=metrics)
    print_outputs(result)
    console.print(f"[green]{stage} done[/green] in {time.monotonic() - start:.1f} s")
    return result


@config_app.command("show")
def config_show(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="list every key with its type, default, current value (where it differs) and description",
    )] = False,
) -> None:
    """Print the resolved configuration (params file + overrides + defaults) as YAML; --explain documents every key."""
    cfg = _load(params, set_)
    typer.echo(explain_config(cfg) if explain else dump_config(cfg), nl=False)


@data_app.command("list")
def data_list(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """List the data versions under shard.output: version, shards, samples, bytes, published time, latest."""
    from clip.shards.versions import list_versions

    cfg = _load(params, set_)
    with exit_on_user_error("data list"):
        found = list_versions(cfg.shard.output, cfg.storage)
    typer.echo(f"{'data_version':<14}{'shards':>8}{'samples':>10}{'bytes':>14}  {'published_at':<29}status")
    for v in found:
        status = "latest" if v.latest else ("" if v.complete else "incomplete")
        typer.echo(f"{v.data_version[:12]:<14}{v.shards:>8}{v.samples:>10}{v.bytes:>14}  "
                   f"{v.published_at or '-':<29}{status}")
    if not found:
        console.print(f"no data versions under {cfg.shard.output}")


@data_app.command("prune")
def data_prune(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    keep: Annotated[int, typer.Option(min=0, help="also keep this many most recently published versions")] = 1,
    runs_dir: Annotated[str, typer.Option(help="run folders whose data versions are kept")] = "models/runs",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be removed, remove nothing")] = False,
) -> None:
    """Remove data versions that are not latest, not among the --keep newest and named by no run in --runs-dir."""
    from clip.shards.versions import prune

    cfg = _load(params, set_)
    with exit_on_user_error("data prune"):
        result = prune(cfg.shard.output, keep=keep, runs_dir=runs_dir, storage_cfg=cfg.storage, dry_run=dry_run)
    for version, why in sorted(result.kept.items()):
        typer.echo(f"kept     {version[:12]}  {why}")
    for v in result.removed:
        typer.echo(f"{'would remove' if dry_run else 'removed '} {v.data_version[:12]}  {v.bytes} bytes")


def _make_stage_command(stage: str) -> None:
    def command(params: ParamsOpt = None, set_: SetOpt = None, metrics: MetricsOpt = None) -> None:
        run_stage(stage, _load(params, set_), metrics)

    command.__doc__ = STAGE_HELP[stage]
    app.command(stage)(command)


for _stage in STAGES:
    if _stage not in ("train", "evaluate"):  # train has launcher options, evaluate dataset shorthands
        _make_stage_command(_stage)


@app.command("train")
def train(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    nproc_per_node: Annotated[int | None, typer.Option(min=1, help="processes on this node (torchrun); default compute.nproc_per_node")] = None,
    nnodes: Annotated[int | None, typer.Option(min=1, help="number of nodes; default compute.nnodes")] = None,
    node_rank: Annotated[int | None, typer.Option(min=0, help="this node's rank (static rendezvous); c10d assigns it when unset")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="host:port of the c10d rendezvous for multi-node runs")] = None,
    max_restarts: Annotated[int | None, typer.Option(min=0, help="torchrun --max-restarts: workers restarted after a failure; default compute.max_restarts")] = None,
    metrics: MetricsOpt = None,
) -> None:
    """Contrastive training (torchrun, one CPU to many GPU nodes) -> models/runs/<model>-<data version>/.

    The launcher options are shorthands for the `compute` keys of the same names (`--nproc-per-node 8` is
    `--set compute.nproc_per_node=8`), checked like every other key."""
    launcher = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "node_rank": node_rank,
                "rdzv_endpoint": rdzv_endpoint, "max_restarts": max_restarts}
    overrides = list(set_ or []) + [f"compute.{key}={value}" for key, value in launcher.items() if value is not None]
    run_stage("train", _load(params, overrides), metrics)


@app.command("evaluate")
def evaluate(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    datasets: Annotated[str | None, typer.Option(help="comma-separated datasets (evaluate.datasets), e.g. cifar10,mnist")] = None,
    root: Annotated[str | None, typer.Option(help="folder holding the datasets (evaluate.data_root)")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="evaluate this PyTorch checkpoint instead of the bundle")] = None,
    metrics: MetricsOpt = None,
) -> None:
    """Zero-shot, linear-probe and retrieval evaluation -> reports/eval/.

    The options are shorthands for `--set evaluate.datasets=[...]`, `evaluate.data_root` and `evaluate.checkpoint`."""
    overrides = list(set_ or [])
    if datasets is not None:
        names = [name.strip() for name in datasets.split(",") if name.strip()]
        overrides.append(f"evaluate.datasets=[{', '.join(names)}]")
    if root is not None:
        overrides.append(f"evaluate.data_root={root}")
    if checkpoint is not None:
        overrides.append(f"evaluate.checkpoint={checkpoint}")
    run_stage("evaluate", _load(params, overrides), metrics)


app.command("predict")(predict_command)  # not a stage: zero-shot from a bundle (pipelines/predict.py)
app.command("index")(index_command)  # not stages: photo search with a bundle (pipelines/search.py)
app.command("search")(search_command)


@app.command("all")
def run_all(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Run every stage in order in this process, without DVC or Prefect (`run` is the orchestrated job)."""
    cfg = _load(params, set_)
    for stage in STAGES:
        run_stage(stage, cfg)
    console.print("[bold green]pipeline finished[/bold green]")


# The orchestration commands start the flows in their own process (`python -m flows...`): pipelines/ never
# imports flows/ (flows -> pipelines -> clip), and a flow run is a process of its own anyway.
def _run_module(module: str, args: list[str]) -> None:
    import subprocess

    raise SystemExit(subprocess.call([sys.executable, "-m", module, *args]))


@app.command("run")
def run_flow(set_: Annotated[list[str] | None, typer.Option(
                 "--set", help="override a value for this run only: params.yaml is left as it is")] = None,
             stages: Annotated[str, typer.Option("--stages", help="comma-separated subset, in DAG order")] = "",
             save: Annotated[bool, typer.Option(
                 "--save", help="write the --set overrides into params.yaml for good instead")] = False,
             ) -> None:
    """The whole pipeline as a Prefect flow, each stage through DVC (what `make pipeline` runs). Unchanged
    stages are skipped. --set applies to this run only (DVC sees it while the run lasts, and the next run
    reruns what it changed with params.yaml's values); with --save it is written into params.yaml for good."""
    # Checked here first, against the params.yaml the flow uses (the checkout's), so a typo is one line and
    # exit 2 before Prefect is imported or its server started; flows/pipeline.py checks again for direct runs.
    _load(str(Path(__file__).resolve().parents[1] / DEFAULT_PARAMS), set_)
    args = [arg for override in set_ or [] for arg in ("--set", override)]
    _run_module("flows.pipeline", args + (["--stages", stages] if stages else []) + (["--save"] if save else []))


def serve_args(cron: str, timezone: str | None = None, paused: bool = False, stages: str | None = None) -> list[str]:
    """The `python -m flows.deploy` arguments of `clip-pipeline serve`."""
    return (["--cron", cron] + (["--timezone", timezone] if timezone else []) + (["--paused"] if paused else [])
            + (["--retrain-stages", stages] if stages else []))


@app.command("serve")
def serve(cron: Annotated[str, typer.Option("--cron", help="weekly-retrain schedule")] = "0 3 * * 1",
          timezone: Annotated[str | None, typer.Option(
              "--timezone", help="the schedule's time zone (IANA, e.g. Europe/Berlin); default UTC")] = None,
          paused: Annotated[bool, typer.Option(
              "--paused", help="start both deployments paused: no scheduled or triggered run until resumed")] = False,
          stages: Annotated[str | None, typer.Option(
              "--stages", help="the stages on-new-data runs, comma-separated [default: train,export,evaluate,promote]"
          )] = None,
          ) -> None:
    """Serve the deployments: weekly-retrain (cron) and on-new-data (runs when a new data version is published).
    One run at a time: a run that would overlap another waits in Prefect's queue (`prefect flow-run ls` shows it
    Scheduled: AwaitingConcurrencySlot, or Late) and starts when the other finishes. Needs a Prefect server
    (`prefect server start`; PREFECT_API_URL)."""
    _run_module("flows.deploy", serve_args(cron, timezone, paused, stages))


@app.command("retrain")
def retrain(set_: Annotated[list[str] | None, typer.Option(
                "--set", help="override a value for this run only: params.yaml is left as it is")] = None) -> None:
    """Start a run of the served weekly-retrain deployment now (`prefect deployment run` shortcut); --set
    applies to that run only (the flow's `overrides`), never to the later scheduled runs."""
    import json
    import shutil
    import subprocess

    if set_:
        _load(str(Path(__file__).resolve().parents[1] / DEFAULT_PARAMS), set_)  # a typo: one line, exit 2
    args = ["deployment", "run", "clip-pipeline/weekly-retrain"]
    if set_:
        args += ["--param", f"overrides={json.dumps(list(set_))}"]
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    raise SystemExit(subprocess.call([prefect, *args]))


def venv_env() -> dict[str, str]:
    """This environment with this interpreter's bin folder first on PATH: the programs a tool starts by name
    (`mlflow models serve` starts `uvicorn`) are the project's, whether or not the venv is activated."""
    import os

    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


@app.command("serve-model")
def serve_model(
    model: Annotated[str, typer.Argument(help="model URI")] = "models:/clip-tiny-vit@champion",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 5000,
) -> None:
    """Serve a registered model over HTTP (`mlflow models serve --env-manager local` in this venv, whatever PATH
    says): POST /invocations, e.g. {"dataframe_records": [{"text": "a dog"}]}. Ctrl-C or SIGTERM stops the server
    and every process it started (mlflow runs the HTTP server as a child of its own)."""
    import signal
    import subprocess

    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
           "-h", host, "-p", str(port)]
    server = subprocess.Popen(cmd, env=venv_env(), start_new_session=True)  # a process group: stopped as one

    def stop(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        code = server.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # what the server left behind when it ended on its own
    raise SystemExit(code)


def main() -> None:  # pragma: no cover - console entry
    prepare_process()
    try:
        app(prog_name="clip-pipeline")
    except Exception as err:  # a bug (bad input exits in one line): its traceback, redacted (typer's would not be)
        print(format_exception_redacted(err), end="", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
