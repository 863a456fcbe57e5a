"""The whole pipeline as a Prefect flow: one task per stage, each running its own DVC stage.

    python -m flows.pipeline [--set train.epochs=2 [--save]] [--stages train,export]
    clip-pipeline run [--set ... [--save]]              # the same flow from the CLI

Why each task runs `dvc repro --single-item <stage>` instead of calling the stage function: DVC's content hashes
(code, params section, upstream outputs; dvc.yaml) are what decides whether a stage is up to date, so the flow and a
plain `dvc repro` agree by construction: a second flow run skips every unchanged stage, a changed `train.*` value
reruns train and what follows, and a flow run that died half-way (killed process, lost machine) is completed by
running it again: the finished stages are up to date in dvc.lock and are skipped, the broken one starts over (and
itself resumes from its own checkpoints / done-records). Prefect's own task caching could not do this: it keys on
the flow run by default and hashes paths as strings, not the data behind them.

Guarantees:
- One flow run at a time per checkout: DVC holds a repository lock for a whole repro and a second concurrent one
  fails after a few seconds, so the flow takes its own lock (`.dvc/tmp/clip-flow.lock`) first. Deployment runs
  never meet here: they queue in Prefect (flows/deploy.py). The lock is the safety net for the other runs (`clip-
  pipeline run`, a script): a second one logs that it waits and for whom, waits at most `lock_timeout_s`
  (LOCK_TIMEOUT_S), then refuses with a message naming the lock and its holder. dvc.lock is only ever written by
  one repro.
- `overrides` ("train.epochs=2") are validated against the typed config and apply to this run only
  (pipelines/params.py `one_off_overrides`): under the checkout lock params.yaml holds them while the stages run, so
  DVC sees the change, reruns the stages whose sections it touches and records it in dvc.lock; afterwards (also
  after a failure) params.yaml is the user's file again. A run killed meanwhile leaves the user's file in
  `.dvc/tmp/run-params/`, and the next flow run puts it back before anything else. The next run after a one-off
  then finds params.yaml differing from dvc.lock and reruns those stages with the user's values: correct, since
  the outputs of the one-off run are not what params.yaml describes. `save_overrides` writes them into params.yaml
  for good instead (comments kept), as `dvc exp run --set-param` does (`clip-pipeline run --set ... --save`).
- The stages that touch the network (collect, shard, train, promote) are retried with backoff (`retry_delays_s`)
  after a crash, never after bad input, which a retry cannot fix. The stage itself tells which: its one error path
  (pipelines._common) records its one-line error in the file CLIP_STAGE_RESULT names; a failed stage that recorded
  nothing (a traceback, a signal, a lost connection) crashed. DVC's own exit status and text are the same for both.
- A failed stage fails the flow run with the stage's own words: its one-line error, or after a crash the last
  lines of its output (the stage marks its own MLflow run failed).
- Each stage's output (its progress and loss lines, the evaluation table, outputs) goes into the flow run's logs
  line by line while it runs, redacted (clip.storage.redact); the promote task adds the decision and its reason.
  Each stage also publishes a Prefect markdown artifact with its metrics (reports/metrics/<stage>.json).
- A version the shard stage publishes inside a flow run that also trains is not announced (FLOW_TRAINS_ENV,
  pipelines/events.py): this run trains it, and the on-new-data deployment must not train it a second time.
- MLflow lineage: one parent run per execution (pipelines/lineage.py) holding every stage's metrics, with each
  stage's own runs nested under it and tagged with the Prefect flow run id, the DVC stage and the params hash.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import prefect.runtime as prefect_runtime
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging.handlers import APILogHandler

from clip.config import load_config
from clip.storage.redact import install_log_redaction, redact
from pipelines._common import (
    STAGE_RESULT_ENV,
    prepare_process,
    print_error,
    read_bad_input,
    read_checkout_metrics,
)
from pipelines.cli import STAGES
from pipelines.events import FLOW_TRAINS_ENV, published_version
from pipelines.lineage import FLOW_RUN_ENV, PARENT_RUN_ENV, finish_execution, start_execution
from pipelines.params import APPLIED_COPY, apply_overrides, one_off_overrides, restore_params

REPO = Path(__file__).resolve().parents[1]
LOCK_NAME = "clip-flow.lock"
RUN_PARAMS_DIR = Path(".dvc") / "tmp" / "run-params"  # the user's params.yaml while a run's one-off overrides are in
PYTHON_ENV = "CLIP_PYTHON"  # the interpreter bin/clip-python runs the stages with (dvc.yaml's cmds)
LOCK_TIMEOUT_S = 60.0  # a direct run that finds the checkout busy; deployment runs queue in Prefect instead
NETWORK_STAGES = frozenset({"collect", "shard", "train", "promote"})
RETRY_DELAYS_S = [10, 60]
OUTPUT_TAIL_BYTES = 65536  # of a stage's output, kept for its error line
CRASH_TAIL_LINES = 12  # of a crashed stage's output, in the failure message


class StageFailed(RuntimeError):
    """A stage exited with an error; the message is the stage's own one-line error, or the tail of its output
    after a crash. `bad_input`: the stage recorded that it refused its input (a retry cannot fix that)."""

    def __init__(self, message: str, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a network stage after a crash (a timeout, a lost connection: a traceback), never after bad input."""
    try:
        state.result()
    except StageFailed as exc:
        return not exc.bad_input
    except Exception:
        return True
    return False


class PipelineBusy(RuntimeError):
    """Another flow run holds this checkout."""


@contextmanager
def checkout_lock(repo: Path, timeout_s: float,
                  log: logging.Logger | logging.LoggerAdapter | None = None) -> Iterator[None]:
    """Exclusive lock on the checkout for a whole flow run; waits up to `timeout_s` (saying so on `log`), then
    PipelineBusy naming the lock file and its holder."""
    path = repo / ".dvc" / "tmp" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise PipelineBusy(
                        f"checkout {repo} is busy: another pipeline run holds {path} ({holder}); gave up after "
                        f"{timeout_s:.0f} s. Run again when it has finished (runs of the served deployments "
                        "queue in Prefect instead), or wait longer with --lock-timeout-s") from None
                if not waiting and log is not None:
                    log.warning("checkout %s is busy (%s holds %s): waiting up to %.0f s", repo, holder, path,
                                timeout_s)
                waiting = True
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stage_env(result_file: Path | None = None) -> dict[str, str]:
    """The stages run with this interpreter (dvc.yaml's cmds start them through bin/clip-python, which takes
    CLIP_PYTHON first), wherever its venv is and whatever PATH says; its bin folder also leads PATH for the
    programs the stages start (torchrun). `result_file`: where the stage records a bad-input refusal
    (pipelines._common.record_bad_input)."""
    env = dict(os.environ)
    env[PYTHON_ENV] = sys.executable
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if result_file is not None:
        env[STAGE_RESULT_ENV] = str(result_file)
    return env


def _one_line_error(output: str) -> str:
    """The stage's own one-line error (pipelines._common prints it last), else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("error:")]
    return (ours or lines or ["the stage failed with no output"])[-1]


def _crash_report(stage: str, output: str) -> str:
    """What a crashed stage said last: the tail of its own output (after DVC's `> <cmd>` echo), then DVC's
    closing line (it names the exit status, e.g. -9 for SIGKILL)."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("> ")]
    own = lines[starts[-1] + 1:] if starts else lines
    stage_lines = [line for line in own if not line.startswith("ERROR:")][-CRASH_TAIL_LINES:]
    dvc_lines = [line for line in own if line.startswith("ERROR:")][-1:]
    said = "\n".join(f"  {line}" for line in stage_lines) or "  (no output)"
    report = f"stage {stage} crashed; its last output:\n{said}" + "".join(f"\n{line}" for line in dvc_lines)
    return redact(report)  # it goes to Prefect's database: no endpoint credentials


class _LineSplitter:
    """Bytes in, whole lines out to `emit`, as they complete: a carriage return (a progress bar redrawn in place)
    keeps only what was drawn last; blank lines are dropped; each line is redacted before `emit` sees it."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.pending = b""

    def feed(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self._emit(line)

    def close(self) -> None:
        self._emit(self.pending)
        self.pending = b""

    def _emit(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r").rsplit(b"\r", 1)[-1].decode("utf-8", "replace").rstrip()
        if line.strip():
            self.emit(redact(line))


def run_dvc_stage(stage: str, repo: Path, echo: bool = False,
                  on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: runs it when DVC says it changed; returns skipped + the metrics.
    `echo`: pass the stage's output (its progress display) through to this process's stderr as it comes.
    `on_line`: called with each line of the output (redacted) as soon as the line is complete."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    result_file = repo / ".dvc" / "tmp" / "stage-results" / f"{stage}.json"
    result_file.unlink(missing_ok=True)  # a record is this attempt's, never an earlier one's
    result_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=repo, env=_stage_env(result_file), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail = bytearray()
    lines = _LineSplitter(on_line) if on_line is not None else None
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # whatever has arrived, without waiting for more
        if echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        if lines is not None:
            lines.feed(chunk)
        tail += chunk
        del tail[:-OUTPUT_TAIL_BYTES]
    if lines is not None:
        lines.close()
    output = tail.decode("utf-8", "replace")
    if proc.wait() != 0:
        refusal = read_bad_input(result_file)
        if refusal is not None:
            raise StageFailed(f"stage {stage}: {refusal}", bad_input=True)
        raise StageFailed(_crash_report(stage, output))
    skipped = "didn't change, skipping" in output
    return {"stage": stage, "skipped": skipped, "metrics": read_checkout_metrics(repo, stage) or {}}


def _markdown(outcome: dict[str, Any]) -> str:
    lines = [f"## {outcome['stage']}: {'up to date (skipped)' if outcome['skipped'] else 'ran'}", "",
             "| metric | value |", "|---|---|"]
    for key, value in sorted(outcome["metrics"].items()):
        if isinstance(value, int | float | str | bool):
            lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def _stage_output_logger(echo: bool) -> Callable[[str], None]:
    """Where the task sends each line of its stage's output: the run logger (console and API), or with `echo`
    the API alone (the terminal shows the output as the stage wrote it already; the run logger's console handler
    would print every line a second time), with the run logger's flow- and task-run ids either way."""
    run_logger = get_run_logger()
    if not echo:
        return lambda line: run_logger.info("%s", line)
    api_only = logging.getLogger("clip.flow.stage_output")
    if not api_only.handlers:
        api_only.propagate = False
        api_only.setLevel(logging.INFO)
        api_only.addHandler(APILogHandler())
    target = logging.LoggerAdapter(api_only, dict(run_logger.extra or {}))
    return lambda line: target.info("%s", line)


def decision_line(metrics: dict[str, Any]) -> str:
    """The promote stage's decision, as its metrics record it: `<model> v<version> -> <alias> (<reason>)`."""
    return (f"{metrics.get('model_name')} v{metrics.get('version')} -> {metrics.get('decision')} "
            f"({metrics.get('reason')})")


def _stage_task(stage: str) -> Any:
    @task(name=stage, retries=2 if stage in NETWORK_STAGES else 0, retry_delay_seconds=RETRY_DELAYS_S,
          retry_condition_fn=_worth_retrying)
    def run_stage(repo: str, echo: bool) -> dict[str, Any]:
        outcome = run_dvc_stage(stage, Path(repo), echo, on_line=_stage_output_logger(echo))
        get_run_logger().info("%s: %s", stage, "up to date, skipped" if outcome["skipped"] else "ran")
        if stage == "promote" and not outcome["skipped"] and outcome["metrics"].get("decision"):
            get_run_logger().info("promote decision: %s", redact(decision_line(outcome["metrics"])))
        create_markdown_artifact(key=f"{stage}-metrics", markdown=_markdown(outcome),
                                 description=f"{stage} stage metrics")
        return outcome

    return run_stage


STAGE_TASKS = {stage: _stage_task(stage) for stage in STAGES}


@task(name="dvc push", retries=2, retry_delay_seconds=RETRY_DELAYS_S)
def push_outputs(repo: str, remote: str) -> None:
    """`dvc push -r <remote>`: the data versions, runs, bundle and reports DVC tracks, to the remote (S3)."""
    result = subprocess.run([sys.executable, "-m", "dvc", "push", "-r", remote], cwd=repo, env=_stage_env(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise StageFailed(f"dvc push -r {remote}: {_one_line_error(result.stderr + result.stdout)}")
    get_run_logger().info("pushed the outputs to DVC remote %s", remote)


@flow(name="clip-pipeline")
def pipeline(overrides: list[str] | None = None, stages: list[str] | None = None, repo: str | None = None,
             lock_timeout_s: float = LOCK_TIMEOUT_S, echo: bool = False,
             data_version: str | None = None, push: str | None = None,
             retry_delays_s: list[float] | None = None, save_overrides: bool = False) -> list[dict[str, Any]]:
    """Run the stages in DAG order through DVC (module docstring); returns one outcome per stage.
    `overrides`: for this run only; with `save_overrides` written into params.yaml for good instead.
    `data_version` (set by the on-new-data trigger): the version the run is for; it is logged, and a warning
    says so when shard.output's latest.json has moved on meanwhile (the run trains on what latest.json names).
    `push`: a DVC remote (e.g. "s3") that every output DVC tracks is pushed to after the stages succeeded.
    `retry_delays_s`: the waits before a crashed network stage's retries (default RETRY_DELAYS_S)."""
    install_log_redaction()  # also when a deployment runs the flow: no credentials in the logs sent to Prefect
    root = Path(repo) if repo else REPO
    chosen = stages or STAGES
    check_stages(chosen)
    log = get_run_logger()
    params_file = root / "params.yaml"
    with checkout_lock(root, lock_timeout_s, log):
        if (root / RUN_PARAMS_DIR / APPLIED_COPY).exists():
            log.warning("a run killed while its one-off overrides were in params.yaml left them there: "
                        "putting the file from before that run back first")
        stale = restore_params(params_file, root / RUN_PARAMS_DIR)
        if stale:
            log.warning("%s", stale)
        if overrides and save_overrides:
            apply_overrides(params_file, overrides)
        one_off = overrides if overrides and not save_overrides else []
        if one_off:
            log.info("one-off overrides, for this run only: %s", ", ".join(one_off))
        with one_off_overrides(params_file, one_off, root / RUN_PARAMS_DIR, log) if one_off else nullcontext():
            return _run_stages(root, [s for s in STAGES if s in chosen], echo, data_version, push, retry_delays_s)


def _run_stages(root: Path, stages: list[str], echo: bool, data_version: str | None, push: str | None,
                retry_delays_s: list[float] | None) -> list[dict[str, Any]]:
    """The flow's body, under the checkout lock with params.yaml as this run sees it."""
    if data_version:
        current = published_version(str(root / "params.yaml"))
        get_run_logger().info("triggered by data version %s (latest.json names %s)", data_version, current)
        if current and current != data_version:
            get_run_logger().warning("latest.json has moved on to %s: training on it", current)
    flow_run_id = str(prefect_runtime.flow_run.id or "") or None
    tracker, parent = start_execution(root, flow_run_id)
    saved = {key: os.environ.get(key) for key in (PARENT_RUN_ENV, FLOW_RUN_ENV, FLOW_TRAINS_ENV)}
    os.environ[PARENT_RUN_ENV] = parent or ""
    os.environ[FLOW_RUN_ENV] = flow_run_id or ""
    # this run trains what its shard stage publishes: no clip.data.published for it (pipelines/events.py)
    os.environ[FLOW_TRAINS_ENV] = (flow_run_id or "this flow run") if "train" in stages else ""
    outcomes: list[dict[str, Any]] = []
    failed = None
    try:
        for stage in stages:
            failed = stage
            stage_task = STAGE_TASKS[stage]
            if retry_delays_s is not None:
                stage_task = stage_task.with_options(retry_delay_seconds=retry_delays_s)
            outcomes.append(stage_task(str(root), echo))
        failed = None
        if push:
            push_outputs(str(root), push)
    finally:
        finish_execution(tracker, root, outcomes, failed)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return outcomes


def check_stages(stages: list[str]) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")


def main(argv: list[str] | None = None) -> None:
    prepare_process()
    parser = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow (each stage through DVC).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value for this run only (params.yaml is left as it is)")
    parser.add_argument("--save", action="store_true",
                        help="write the --set overrides into params.yaml for good instead")
    parser.add_argument("--stages", default="", help="comma-separated subset, in DAG order")
    parser.add_argument("--lock-timeout-s", type=float, default=LOCK_TIMEOUT_S,
                        help="how long to wait for another run on this checkout to finish")
    parser.add_argument("--push", default=None, metavar="REMOTE", help="dvc push the outputs to this remote after")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s] or None
    # Checked before the flow starts (Prefect's server, its logs, a flow run marked failed): a typo in a key or a
    # stage name is one line and exit 2. ConfigError is a ValueError.
    try:
        check_stages(stages or STAGES)
        load_config(REPO / "params.yaml", args.overrides)
    except ValueError as exc:
        print_error(str(exc))
        raise SystemExit(2) from None
    try:
        outcomes = pipeline(overrides=args.overrides, stages=stages, lock_timeout_s=args.lock_timeout_s, echo=True,
                            push=args.push, save_overrides=args.save)
    except (StageFailed, PipelineBusy, ValueError) as exc:
        print_error(str(exc))
        raise SystemExit(1) from None
    print(summary(outcomes, REPO, args.overrides))


def summary(outcomes: list[dict[str, Any]], repo: Path, overrides: list[str] | None = None) -> str:
    """Where the results are: the evaluation table, the bundle, the MLflow UI, and the champion decision
    (`overrides`: the run's, which may have moved them)."""
    cfg = load_config(repo / "params.yaml", overrides)
    lines = ["", "pipeline finished: " + ", ".join(
        f"{o['stage']} ({'up to date' if o['skipped'] else 'ran'})" for o in outcomes)]
    done = {o["stage"]: o for o in outcomes}
    if "evaluate" in done:
        lines.append(f"  evaluation table: {cfg.evaluate.output_dir}/results.md")
    if "export" in done:
        lines.append(f"  bundle:           {cfg.export.output_dir}")
    if cfg.tracking.enabled:
        lines.append(f"  MLflow UI:        mlflow ui --backend-store-uri {cfg.tracking.uri}")
    promote = done.get("promote", {})
    if promote.get("skipped") or promote.get("metrics"):  # a skipped promote's metrics: an earlier decision
        said = "skipped: nothing changed" if promote["skipped"] else decision_line(promote["metrics"])
        lines.append(f"  decision:         {said}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
