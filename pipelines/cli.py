"""The `clip-pipeline` command: one entry point for every stage.

    clip-pipeline --help
    clip-pipeline config show [--params params.yaml] [--set train.batch_size=64]
    clip-pipeline collect|dedup|shard|train|export|evaluate|promote [--params ...] [--set key=value ...]
    clip-pipeline train --nproc-per-node 8          # torchrun on this machine
    clip-pipeline all                               # every built stage in order (what `make pipeline` runs)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console

from clip.config import DEFAULT_PARAMS, ConfigError, PipelineConfig, dump_config, load_config
from pipelines._common import DEBUG_ENV, is_user_error

STAGES = ["collect", "dedup", "shard", "train", "export", "evaluate", "promote"]
STAGE_HELP = {
    "collect": "Build queries, match and balance candidate pairs, fetch and validate images -> data/raw/.",
    "dedup": "Remove exact and near duplicates and evaluation-set overlap -> data/dedup/.",
    "shard": "Write shuffled webdataset shards + manifest, publish to local disk or S3 -> data/shards/.",
    "train": "Contrastive training (torchrun, one CPU to many GPU nodes) -> models/checkpoints/.",
    "export": "ONNX encoders + tokenizer + preprocessing, checked against the checkpoint -> models/bundle/.",
    "evaluate": "Zero-shot and linear-probe evaluation -> reports/eval/.",
    "promote": "Register the model in MLflow; move the champion alias only if it is better.",
}

console = Console(stderr=True)
app = typer.Typer(help="clip-pipeline: from raw web (image, text) pairs to an evaluated CLIP model.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ParamsOpt = Annotated[str, typer.Option("--params", help="params file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a value: --set train.batch_size=64")]


def _load(params: str, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(params, overrides or [])
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def stage_is_built(stage: str) -> bool:
    return importlib.util.find_spec(f"pipelines.{stage}") is not None


def run_stage(stage: str, cfg: PipelineConfig, **launch_args: Any) -> dict:
    """Run one stage in this process; `train` goes through its launcher (torchrun when several processes)."""
    if not stage_is_built(stage):
        console.print(f"[yellow]stage '{stage}' is not built yet: skipped[/yellow]")
        return {"skipped": True}
    module = importlib.import_module(f"pipelines.{stage}")
    console.rule(f"[bold]{stage}")
    start = time.monotonic()
    try:
        metrics = module.launch(cfg, **launch_args) if stage == "train" else module.run(cfg)
    except Exception as err:
        # Bad input (missing manifest, unknown model, mismatched checkpoint, ...) gets one clear line, not a
        # page of traceback; errors of other kinds, or any with CLIP_PIPELINE_DEBUG=1, keep their traceback.
        if not is_user_error(err) or os.environ.get(DEBUG_ENV):
            raise
        console.print(f"[red]error:[/red] {stage}: {type(err).__name__}: {err}", markup=True, highlight=False)
        console.print(f"(set {DEBUG_ENV}=1 for the traceback)", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"[green]{stage} done[/green] in {time.monotonic() - start:.1f} s")
    return metrics


@config_app.command("show")
def config_show(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Print the resolved configuration (params file + overrides + defaults) as YAML."""
    typer.echo(dump_config(_load(params, set_)), nl=False)


def _make_stage_command(stage: str) -> None:
    def command(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
        run_stage(stage, _load(params, set_))

    command.__doc__ = STAGE_HELP[stage]
    app.command(stage)(command)


for _stage in STAGES:
    if _stage != "train":
        _make_stage_command(_stage)


@app.command("train")
def train(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    nproc_per_node: Annotated[int | None, typer.Option(min=1, help="processes on this node (torchrun); default compute.nproc_per_node")] = None,
    nnodes: Annotated[int | None, typer.Option(min=1, help="number of nodes; default compute.nnodes")] = None,
    node_rank: Annotated[int | None, typer.Option(min=0, help="this node's rank (static rendezvous); c10d assigns it when unset")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="host:port of the c10d rendezvous for multi-node runs")] = None,
    max_restarts: Annotated[int, typer.Option(min=0, help="torchrun --max-restarts: workers restarted after a failure")] = 0,
) -> None:
    """Contrastive training (torchrun, one CPU to many GPU nodes) -> models/checkpoints/."""
    run_stage(
        "train", _load(params, set_), params=params, overrides=set_ or [], nproc_per_node=nproc_per_node,
        nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts,
    )


@app.command("all")
def run_all(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Run every built stage in order on the given config (what `make pipeline` runs)."""
    cfg = _load(params, set_)
    missing = [s for s in STAGES if not stage_is_built(s)]
    if missing:
        console.print(f"[yellow]not built yet (will be skipped): {', '.join(missing)}[/yellow]")
    for stage in STAGES:
        run_stage(stage, cfg, **({"params": params, "overrides": set_ or []} if stage == "train" else {}))
    console.print("[bold green]pipeline finished[/bold green]")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="clip-pipeline")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
