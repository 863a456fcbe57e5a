"""What every stage entry point shares, so that `clip-pipeline <stage>` and `python -m pipelines.<stage>` behave alike.

- `STAGES`: the seven stages in pipeline order, each a module `pipelines.<stage>`: the one list of them, which
  the CLI (and, through it, the flow) imports.
- `execute_stage(stage, cfg)`: imports `pipelines.<stage>`, runs it with the Rich progress display (or the given
  progress sink) and writes its metrics (`metrics_location`: `--metrics PATH`, which dvc.yaml's cmds pass as
  `reports/metrics/<stage>.json`; by hand in a checkout whose dvc.yaml declares that file, beside the stage's
  output, so a run by hand never changes what DVC tracks; elsewhere `reports/metrics/<stage>.json`). The CLI's
  `run_stage` and `stage_main` both go through it; so can a flow.
- The one error path, `exit_on_user_error(stage)`: bad input found while running (exceptions defined in `clip`,
  and ValueError: a missing manifest, a stale keep-list, an unknown model, ...) is one line on stderr and exit
  status 1; `CLIP_PIPELINE_DEBUG=1` re-raises it with its traceback. Any other exception keeps its traceback.
- Config errors (`load_stage_config`): the message, exit status 2, nothing runs.
- `stage_main(stage, run, argv)`: the body of every `pipelines/<stage>.py`'s `main`.
- Both error paths also write their line to the file CLIP_STAGE_RESULT names, when set (`record_bad_input`): the
  flow (flows/pipeline.py) sets it, since `dvc repro` reports every failed stage alike and only the stage knows
  that it refused bad input (no retry) rather than crashed (retried).
- `prepare_process()`: what every entry point does first: log records and crash tracebacks redacted
  (clip.storage.redact: no `user:password@` of an endpoint URL reaches a terminal, a log or a tracking store).
- Every message printed here is redacted the same way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from clip.config import DEFAULT_PARAMS, ConfigError, PipelineConfig, load_config
from clip.formats.checkpoint import RUNS_DIR
from clip.formats.metrics import metrics_beside, metrics_uri, read_metrics, write_metrics
from clip.progress import Progress
from clip.result import StageResult
from clip.storage import ObjectNotFound, StorageError, write_bytes
from clip.storage.redact import format_exception_redacted, install_log_redaction, redact
from pipelines._progress import rich_progress

STAGES = ("collect", "dedup", "shard", "train", "export", "evaluate", "promote")  # pipeline order
DEBUG_ENV = "CLIP_PIPELINE_DEBUG"
STAGE_RESULT_ENV = "CLIP_STAGE_RESULT"  # a JSON file path: where a stage records that it refused bad input
KILL_ONCE_ENV = "CLIP_DEBUG_KILL_ONCE"  # "<stage>:<marker file>": test aid, the stage SIGKILLs itself once
StageRun = Callable[[PipelineConfig, Progress | None], StageResult]  # what `pipelines.<stage>.run` is

console = Console(stderr=True)


def print_error(message: str) -> None:
    """`error: <message>` on stderr, redacted (URL credentials masked)."""
    console.print(Text.assemble(("error:", "red"), f" {redact(message)}"), soft_wrap=True, highlight=False)


def prepare_process() -> None:
    """First thing every entry point does: redact every log record, and any traceback that ends the process
    (sys.excepthook), so a crash prints no URL credentials either. (The telemetry opt-outs are set earlier, on
    import of this package: pipelines/__init__.py.)"""
    install_log_redaction()
    sys.excepthook = lambda _type, err, _tb: print(format_exception_redacted(err), end="", file=sys.stderr)


def load_stage_config(params: str | None, overrides: list[str], note_defaults: bool = True) -> PipelineConfig:
    """The typed config from `params` plus `--set` overrides; a config error is printed and exits with 2.

    `params` None: params.yaml in the working folder, where a missing file means the built-in defaults (said
    in one line on stderr, naming the folder, unless `note_defaults` is false: a command that reads only the
    storage section); a file named explicitly must exist."""
    try:
        if params is None:
            params = DEFAULT_PARAMS
            if note_defaults and not Path(params).exists():
                console.print(f"note: no {params} in {Path.cwd()}: using the built-in defaults",
                              soft_wrap=True, highlight=False, markup=False)
        elif not Path(params).is_file():
            raise ConfigError(f"params file {params} does not exist (--params)")
        return load_config(params, overrides)
    except ConfigError as err:
        record_bad_input(f"error: {err}")
        print_error(str(err))
        raise SystemExit(2) from None


METRICS_HELP = ("where the metrics JSON goes (dvc.yaml passes reports/metrics/<stage>.json); default: beside the "
                "stage's output in a DVC checkout, else reports/metrics/<stage>.json")


def parse_stage_args(argv: list[str] | None, description: str) -> tuple[PipelineConfig, str | None]:
    """`--params`, `--set KEY=VALUE` (repeatable) and `--metrics PATH` -> the typed config (exit 2 on a config
    error) and the metrics path given (None: `metrics_location`'s default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=None,
                        help="params file (default: params.yaml in the working folder; built-in defaults without one)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=64 (repeatable)",
    )
    parser.add_argument("--metrics", default=None, metavar="PATH", help=METRICS_HELP)
    args = parser.parse_args(argv)
    return load_stage_config(args.params, args.overrides), args.metrics


def stage_output(stage: str, cfg: PipelineConfig) -> str | None:
    """Where `stage` writes what it makes (promote: the bundle it registers); None for a stage not listed."""
    return {"collect": cfg.collect.output_dir, "dedup": cfg.dedup.output_dir, "shard": cfg.shard.output,
            "train": cfg.train.output or RUNS_DIR, "export": cfg.export.output_dir,
            "evaluate": cfg.evaluate.output_dir, "promote": cfg.promote.bundle}.get(stage)


def declared_by_dvc(stage: str, uri: str) -> bool:
    """Whether the working folder's dvc.yaml declares `uri` as one of `stage`'s metrics (a DVC checkout)."""
    import yaml

    try:
        stages = yaml.safe_load(Path("dvc.yaml").read_text()).get("stages") or {}
        entries = (stages.get(stage) or {}).get("metrics") or []
    except (OSError, AttributeError, yaml.YAMLError):
        return False
    return uri in [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


def metrics_location(stage: str, cfg: PipelineConfig, given: str | None = None) -> str:
    """Where `stage` writes its metrics: `given` (--metrics); under DVC (DVC_STAGE, which `dvc repro` exports to
    its commands and so to torchrun's workers) reports/metrics/<stage>.json; by hand where a dvc.yaml declares that
    file, beside the stage's output (clip.formats.metrics); elsewhere reports/metrics/<stage>.json."""
    if given:
        return given
    uri = metrics_uri(stage)
    output = stage_output(stage, cfg)
    if os.environ.get("DVC_STAGE") or output is None or not declared_by_dvc(stage, uri):
        return uri
    return metrics_beside(output, stage)


def read_checkout_metrics(repo: Path, stage: str) -> dict[str, Any] | None:
    """The metrics DVC's last run of `stage` left in the checkout at `repo` (`metrics_uri(stage)`, relative to
    it); None when it has none."""
    uri = str(Path(repo) / metrics_uri(stage))
    try:
        return read_metrics(uri)
    except ObjectNotFound:
        return None


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
        if not is_user_error(err):
            raise
        # A storage error (an endpoint down, throttling past the storage layer's own retries) is worth the
        # flow's retry later: it is printed in one line but not recorded as bad input. A missing object is.
        if not isinstance(err, StorageError) or isinstance(err, ObjectNotFound):
            record_bad_input(f"error: {stage}: {type(err).__name__}: {err}")
        if os.environ.get(DEBUG_ENV):
            raise
        print_error(f"{stage}: {type(err).__name__}: {err}")
        console.print(f"(set {DEBUG_ENV}=1 for the traceback)", soft_wrap=True, highlight=False)
        raise SystemExit(1) from None


def record_bad_input(line: str) -> None:
    """Write {"bad_input": true, "error": line} to the file CLIP_STAGE_RESULT names (nothing when unset).
    Every rank of a torchrun job may write it: the write is atomic and the content the same."""
    path = os.environ.get(STAGE_RESULT_ENV)
    if path:
        write_bytes(path, json.dumps({"bad_input": True, "error": redact(line)}).encode())


def read_bad_input(path: Path) -> str | None:
    """The error line a stage recorded with `record_bad_input` in `path`, or None when it recorded none."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return str(record["error"]) if record.get("bad_input") else None


def kill_once_if_asked(stage: str) -> None:
    """Test aid for the flow's retries: with CLIP_DEBUG_KILL_ONCE=<stage>:<marker> and no marker file yet, create
    the marker and SIGKILL this process, as a lost machine or the OOM killer would; the next attempt runs."""
    target, _, marker = os.environ.get(KILL_ONCE_ENV, "").partition(":")
    if target != stage or not marker or Path(marker).exists():
        return
    Path(marker).touch()
    console.print(f"{KILL_ONCE_ENV}: {stage} kills itself (SIGKILL), once", soft_wrap=True, highlight=False,
                  markup=False)
    os.kill(os.getpid(), signal.SIGKILL)


def execute_stage(stage: str, cfg: PipelineConfig, progress: Progress | None = None,
                  run: StageRun | None = None, metrics: str | None = None) -> StageResult:
    """Run one stage and write its metrics to `metrics_location(stage, cfg, metrics)`; returns its result.

    `run`: the stage's `run(cfg, progress)`, by default `pipelines.<stage>.run`. `progress`: where progress goes;
    None draws Rich bars on stderr. Errors propagate (wrap the call in `exit_on_user_error` for the CLI's); an
    error that carries the stage's partial result (`err.result`, e.g. evaluate's failed datasets) has those
    metrics written first.
    """
    if run is None:
        run = importlib.import_module(f"pipelines.{stage}").run
    location = metrics_location(stage, cfg, metrics)
    cfg = with_lineage(stage, cfg)
    try:
        with rich_progress(console) if progress is None else nullcontext(progress) as sink:
            result = run(cfg, sink)
    except Exception as err:
        partial = getattr(err, "result", None)
        if isinstance(partial, StageResult) and is_rank_zero():
            write_metrics(location, partial.metrics, cfg.storage)
        raise
    if is_rank_zero():  # the ranks of a torchrun job all return the same metrics: one writer
        result.outputs["metrics"] = write_metrics(location, result.metrics, cfg.storage)
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
    prepare_process()
    module_doc = sys.modules[run.__module__].__doc__ if run.__module__ in sys.modules else None
    cfg, metrics = parse_stage_args(argv, (module_doc or f"The {stage} stage.").strip().splitlines()[0])
    kill_once_if_asked(stage)
    start = time.monotonic()
    with exit_on_user_error(stage):
        result = execute_stage(stage, cfg, run=run, metrics=metrics)
    if not is_rank_zero():
        return
    print_outputs(result)
    console.print(f"{stage} done in {time.monotonic() - start:.1f} s", highlight=False)
