"""What every stage entry point shares, so that `clip-pipeline <stage>` and `python -m pipelines.<stage>` behave alike.

- `execute_stage(stage, cfg)`: imports `pipelines.<stage>`, runs it with the Rich progress display (or the given
  progress sink) and writes its metrics to `reports/metrics/<stage>.json` (clip.formats.metrics). The CLI's
  `run_stage` and `stage_main` both go through it; so can a flow.
- The one error path, `exit_on_user_error(stage)`: bad input found while running (exceptions defined in `clip`,
  and ValueError: a missing manifest, a stale keep-list, an unknown model, ...) is one line on stderr and exit
  status 1; `CLIP_PIPELINE_DEBUG=1` re-raises it with its traceback. Any other exception keeps its traceback.
- Config errors (`load_stage_config`): the message, exit status 2, nothing runs.
- `stage_main(stage, run, argv)`: the body of every `pipelines/<stage>.py`'s `main`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from rich.console import Console
from rich.text import Text

from clip.config import DEFAULT_PARAMS, ConfigError, PipelineConfig, load_config
from clip.formats.metrics import metrics_uri, write_metrics
from clip.progress import Progress
from clip.result import StageResult
from pipelines._progress import rich_progress

DEBUG_ENV = "CLIP_PIPELINE_DEBUG"
StageRun = Callable[[PipelineConfig, Progress | None], StageResult]  # what `pipelines.<stage>.run` is

console = Console(stderr=True)


def load_stage_config(params: str, overrides: list[str]) -> PipelineConfig:
    """The typed config from `params` plus `--set` overrides; a config error is printed and exits with 2."""
    try:
        return load_config(params, overrides)
    except ConfigError as err:
        console.print(Text.assemble(("error:", "red"), f" {err}"), soft_wrap=True, highlight=False)
        raise SystemExit(2) from None


def parse_stage_args(argv: list[str] | None, description: str) -> PipelineConfig:
    """`--params` and `--set KEY=VALUE` (repeatable) -> the typed config (exit 2 on a config error)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=64 (repeatable)",
    )
    args = parser.parse_args(argv)
    return load_stage_config(args.params, args.overrides)


_OUR_PACKAGES = tuple(str(Path(module.__file__).resolve().parent) + os.sep
                      for module in (importlib.import_module("clip"), importlib.import_module("pipelines")))


def raised_by_our_code(err: BaseException) -> bool:
    """Whether the innermost frame of `err`'s traceback lies in clip/ or pipelines/ (not in a library)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_OUR_PACKAGES)


def is_user_error(err: BaseException) -> bool:
    """Bad input, reported in one line: an exception class of this project (clip.*: MissingInputError,
    FormatError, ConfigError, ...), or a ValueError raised by our own code. A ValueError raised inside a
    third-party library is a bug to see whole: it keeps its traceback."""
    if type(err).__module__.split(".")[0] == "clip":
        return True
    return isinstance(err, ValueError) and raised_by_our_code(err)


@contextmanager
def exit_on_user_error(stage: str) -> Iterator[None]:
    """The one error path of every entry point: bad input -> one line on stderr and exit status 1."""
    try:
        yield
    except Exception as err:
        # Bad input (missing manifest, unknown model, mismatched checkpoint, ...) gets one clear line, not a
        # page of traceback; errors of other kinds, or any with CLIP_PIPELINE_DEBUG=1, keep their traceback.
        if not is_user_error(err) or os.environ.get(DEBUG_ENV):
            raise
        console.print(Text.assemble(("error:", "red"), f" {stage}: {type(err).__name__}: {err}"),
                      soft_wrap=True, highlight=False)
        console.print(f"(set {DEBUG_ENV}=1 for the traceback)", soft_wrap=True, highlight=False)
        raise SystemExit(1) from None


def execute_stage(stage: str, cfg: PipelineConfig, progress: Progress | None = None,
                  run: StageRun | None = None) -> StageResult:
    """Run one stage and write its metrics to `reports/metrics/<stage>.json`; returns its result.

    `run`: the stage's `run(cfg, progress)`, by default `pipelines.<stage>.run`. `progress`: where progress goes;
    None draws Rich bars on stderr. Errors propagate (wrap the call in `exit_on_user_error` for the CLI's).
    """
    if run is None:
        run = importlib.import_module(f"pipelines.{stage}").run
    cfg = with_lineage(stage, cfg)
    with rich_progress(console) if progress is None else nullcontext(progress) as sink:
        result = run(cfg, sink)
    if is_rank_zero():  # the ranks of a torchrun job all return the same metrics: one writer
        result.outputs["metrics"] = write_metrics(metrics_uri(stage), result.metrics, cfg.storage)
    return result


PARENT_RUN_ENV = "CLIP_MLFLOW_PARENT_RUN_ID"  # set by flows/pipeline.py: the execution's parent MLflow run
FLOW_RUN_ENV = "CLIP_PREFECT_FLOW_RUN_ID"


def params_hash(cfg: PipelineConfig, stage: str) -> str:
    """sha256 (16 hex) of the stage's own section of the resolved config: what DVC tracks for it."""
    import hashlib
    import json

    section = getattr(cfg, stage, None)
    data = section.model_dump(mode="json") if section is not None else {}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def with_lineage(stage: str, cfg: PipelineConfig) -> PipelineConfig:
    """The config with the lineage tags every MLflow run of this stage carries: the stage, its params hash, and,
    under the pipeline flow, the parent run of the execution, the Prefect flow run id and the DVC stage."""
    tags = {**cfg.tracking.run_tags, "stage": stage, "params_hash": params_hash(cfg, stage)}
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    if os.environ.get("DVC_ROOT") or os.environ.get("DVC_STAGE"):  # exported by `dvc repro` to its commands
        tags["dvc_stage"] = os.environ.get("DVC_STAGE", stage)
    update: dict[str, object] = {"run_tags": tags}
    if os.environ.get(PARENT_RUN_ENV) and not cfg.tracking.parent_run_id:
        update["parent_run_id"] = os.environ[PARENT_RUN_ENV]
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update=update)})


def is_rank_zero() -> bool:
    """False inside a launched worker other than rank 0 (torchrun's RANK, or SLURM's task id under srun)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0


def print_outputs(result: StageResult) -> None:
    """One line per written artifact: `name: URI`."""
    for name, uri in result.outputs.items():
        console.print(f"  {name}: {uri}", soft_wrap=True, highlight=False, markup=False)


def stage_main(stage: str, run: StageRun, argv: list[str] | None = None) -> None:
    """The body of `python -m pipelines.<stage>`: parse `--params` / `--set`, run through `execute_stage`,
    report errors through `exit_on_user_error`. The argument parser's description is the first line of the
    stage module's docstring."""
    if not callable(run):
        raise TypeError(f"stage_main({stage!r}, run, argv): run must be the stage's run function")
    module_doc = sys.modules[run.__module__].__doc__ if run.__module__ in sys.modules else None
    cfg = parse_stage_args(argv, (module_doc or f"The {stage} stage.").strip().splitlines()[0])
    start = time.monotonic()
    with exit_on_user_error(stage):
        result = execute_stage(stage, cfg, run=run)
    if not is_rank_zero():
        return
    print_outputs(result)
    console.print(f"{stage} done in {time.monotonic() - start:.1f} s", highlight=False)
