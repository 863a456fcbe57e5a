"""The `clip-pipeline` command: one entry point for every stage.

    clip-pipeline --help
    clip-pipeline config show [--params params.yaml] [--set train.batch_size=64] [--explain]
    clip-pipeline collect|dedup|shard|train|export|evaluate|promote [--params ...] [--set key=value ...]
    clip-pipeline train --nproc-per-node 8          # torchrun on this machine
    clip-pipeline all                               # every built stage in order (what `make pipeline` runs)
    clip-pipeline data list | data prune [--keep N] [--dry-run]   # data versions under shard.output
    clip-pipeline predict --bundle models/bundle a.jpg b.png --labels "cat,dog"   # zero-shot, no torch
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from clip.config import DEFAULT_PARAMS, PipelineConfig, dump_config, explain_config
from clip.result import StageResult
from pipelines._common import execute_stage, exit_on_user_error, load_stage_config, print_outputs
from pipelines.predict import predict as predict_command

STAGES = ["collect", "dedup", "shard", "train", "export", "evaluate", "promote"]
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

ParamsOpt = Annotated[str, typer.Option("--params", help="params file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a value: --set train.batch_size=64")]


def _load(params: str, overrides: list[str] | None) -> PipelineConfig:
    """The typed config; a config error is printed and exits with status 2 (pipelines._common)."""
    return load_stage_config(params, overrides or [])


def stage_is_built(stage: str) -> bool:
    return importlib.util.find_spec(f"pipelines.{stage}") is not None


def run_stage(stage: str, cfg: PipelineConfig) -> StageResult | None:
    """Run one stage through `execute_stage` (metrics to reports/metrics/<stage>.json); None when the stage is
    not built yet. Bad input exits with status 1 and one line (pipelines._common). `train` is no exception: it
    launches torchrun itself when `compute` asks for several processes."""
    if not stage_is_built(stage):
        console.print(f"[yellow]stage '{stage}' is not built yet: skipped[/yellow]")
        return None
    console.rule(f"[bold]{stage}")
    start = time.monotonic()
    with exit_on_user_error(stage):
        result = execute_stage(stage, cfg)
    print_outputs(result)
    console.print(f"[green]{stage} done[/green] in {time.monotonic() - start:.1f} s")
    return result


@config_app.command("show")
def config_show(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="list every key with its type, default, current value (where it differs) and description",
    )] = False,
) -> None:
    """Print the resolved configuration (params file + overrides + defaults) as YAML; --explain documents every key."""
    cfg = _load(params, set_)
    typer.echo(explain_config(cfg) if explain else dump_config(cfg), nl=False)


@data_app.command("list")
def data_list(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
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
    params: ParamsOpt = DEFAULT_PARAMS,
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
    def command(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
        run_stage(stage, _load(params, set_))

    command.__doc__ = STAGE_HELP[stage]
    app.command(stage)(command)


for _stage in STAGES:
    if _stage not in ("train", "evaluate"):  # train has launcher options, evaluate dataset shorthands
        _make_stage_command(_stage)


@app.command("train")
def train(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    nproc_per_node: Annotated[int | None, typer.Option(min=1, help="processes on this node (torchrun); default compute.nproc_per_node")] = None,
    nnodes: Annotated[int | None, typer.Option(min=1, help="number of nodes; default compute.nnodes")] = None,
    node_rank: Annotated[int | None, typer.Option(min=0, help="this node's rank (static rendezvous); c10d assigns it when unset")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="host:port of the c10d rendezvous for multi-node runs")] = None,
    max_restarts: Annotated[int | None, typer.Option(min=0, help="torchrun --max-restarts: workers restarted after a failure; default compute.max_restarts")] = None,
) -> None:
    """Contrastive training (torchrun, one CPU to many GPU nodes) -> models/runs/<model>-<data version>/.

    The launcher options are shorthands for the `compute` keys of the same names (`--nproc-per-node 8` is
    `--set compute.nproc_per_node=8`), checked like every other key."""
    launcher = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "node_rank": node_rank,
                "rdzv_endpoint": rdzv_endpoint, "max_restarts": max_restarts}
    overrides = list(set_ or []) + [f"compute.{key}={value}" for key, value in launcher.items() if value is not None]
    run_stage("train", _load(params, overrides))


@app.command("evaluate")
def evaluate(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    datasets: Annotated[str | None, typer.Option(help="comma-separated datasets (evaluate.datasets), e.g. cifar10,mnist")] = None,
    root: Annotated[str | None, typer.Option(help="folder holding the datasets (evaluate.data_root)")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="evaluate this PyTorch checkpoint instead of the bundle")] = None,
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
    run_stage("evaluate", _load(params, overrides))


app.command("predict")(predict_command)  # not a stage: zero-shot from a bundle (pipelines/predict.py)


@app.command("all")
def run_all(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Run every stage in order in this process, without DVC or Prefect (`run` is the orchestrated job)."""
    cfg = _load(params, set_)
    missing = [s for s in STAGES if not stage_is_built(s)]
    if missing:
        console.print(f"[yellow]not built yet (will be skipped): {', '.join(missing)}[/yellow]")
    for stage in STAGES:
        run_stage(stage, cfg)
    console.print("[bold green]pipeline finished[/bold green]")


# The orchestration commands start the flows in their own process (`python -m flows...`): pipelines/ never
# imports flows/ (flows -> pipelines -> clip), and a flow run is a process of its own anyway.
def _run_module(module: str, args: list[str]) -> None:
    import subprocess

    raise SystemExit(subprocess.call([sys.executable, "-m", module, *args]))


@app.command("run")
def run_flow(set_: SetOpt = None,
             stages: Annotated[str, typer.Option("--stages", help="comma-separated subset, in DAG order")] = "",
             ) -> None:
    """The whole pipeline as a Prefect flow, each stage through DVC (what `make pipeline` runs). Unchanged
    stages are skipped; --set writes the overrides into params.yaml first (as `dvc exp run --set-param`)."""
    args = [arg for override in set_ or [] for arg in ("--set", override)]
    _run_module("flows.pipeline", args + (["--stages", stages] if stages else []))


@app.command("serve")
def serve(cron: Annotated[str, typer.Option("--cron", help="weekly-retrain schedule")] = "0 3 * * 1") -> None:
    """Serve the deployments: weekly-retrain (cron) and on-new-data (runs when a data version is published).
    Needs a Prefect server (`prefect server start`; PREFECT_API_URL)."""
    _run_module("flows.deploy", ["--cron", cron])


@app.command("retrain")
def retrain(set_: SetOpt = None) -> None:
    """Start a run of the served weekly-retrain deployment now (`prefect deployment run` shortcut)."""
    import json

    args = ["deployment", "run", "clip-pipeline/weekly-retrain"]
    if set_:
        args += ["--param", f"overrides={json.dumps(list(set_))}"]
    import shutil

    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    import subprocess

    raise SystemExit(subprocess.call([prefect, *args]))


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="clip-pipeline")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
