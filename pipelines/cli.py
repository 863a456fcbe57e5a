"""The `clip-pipeline` command: one entry point for every stage.

    clip-pipeline --help
    clip-pipeline config show [--params params.yaml] [--set train.batch_size=64] [--explain]
    clip-pipeline collect|dedup|shard|train|export|evaluate|promote [--params ...] [--set key=value ...]
    clip-pipeline train --nproc-per-node 8          # torchrun on this machine
    clip-pipeline all                               # every built stage in order (what `make pipeline` runs)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from typing import Annotated

import typer
from rich.console import Console

from clip.config import DEFAULT_PARAMS, PipelineConfig, dump_config, explain_config
from clip.result import StageResult
from pipelines._common import execute_stage, exit_on_user_error, load_stage_config, print_outputs

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


def _make_stage_command(stage: str) -> None:
    def command(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
        run_stage(stage, _load(params, set_))

    command.__doc__ = STAGE_HELP[stage]
    app.command(stage)(command)


for _stage in STAGES:
    if _stage != "train":  # train has launcher options too
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


@app.command("all")
def run_all(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Run every built stage in order on the given config (what `make pipeline` runs)."""
    cfg = _load(params, set_)
    missing = [s for s in STAGES if not stage_is_built(s)]
    if missing:
        console.print(f"[yellow]not built yet (will be skipped): {', '.join(missing)}[/yellow]")
    for stage in STAGES:
        run_stage(stage, cfg)
    console.print("[bold green]pipeline finished[/bold green]")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="clip-pipeline")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
