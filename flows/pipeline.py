"""The whole pipeline as a Prefect flow: one task per stage, each running its own DVC stage.

    python -m flows.pipeline [--set train.epochs=2] [--stages train,export]
    clip-pipeline run [--set ...]                       # the same flow from the CLI

Why each task runs `dvc repro --single-item <stage>` instead of calling the stage function: DVC's content hashes
(code, params section, upstream outputs; dvc.yaml) are what decides whether a stage is up to date, so the flow and a
plain `dvc repro` agree by construction: a second flow run skips every unchanged stage, a changed `train.*` value
reruns train and what follows, and a flow run that died half-way (killed process, lost machine) is completed by
running it again: the finished stages are up to date in dvc.lock and are skipped, the broken one starts over (and
itself resumes from its own checkpoints / done-records). Prefect's own task caching could not do this: it keys on
the flow run by default and hashes paths as strings, not the data behind them.

Guarantees:
- One flow run at a time per checkout: DVC holds a repository lock for a whole repro and a second concurrent one
  fails after a few seconds, so the flow takes its own lock (`.dvc/tmp/clip-flow.lock`) first; a second flow run on
  the same checkout waits up to `lock_timeout_s`, then refuses with a message naming the holder. dvc.lock is only
  ever written by one repro.
- `overrides` ("train.epochs=2") are validated against the typed config, then written into params.yaml (comments
  kept), as `dvc exp run --set-param` does: params.yaml is what DVC tracks, so the change is seen and recorded.
- The stages that touch the network (collect, shard, train, promote) are retried with backoff after a crash (not
  after a one-line bad-input error, which a retry cannot fix); a failed stage fails the flow run with the stage's
  one-line error (the stage marks its own MLflow run failed).
- Each stage publishes a Prefect markdown artifact with its metrics (reports/metrics/<stage>.json).
- MLflow lineage: one parent run per execution (pipelines/lineage.py) holding every stage's metrics, with each
  stage's own runs nested under it and tagged with the Prefect flow run id, the DVC stage and the params hash.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prefect.runtime as prefect_runtime
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipelines.cli import STAGES
from pipelines.events import published_version
from pipelines.lineage import FLOW_RUN_ENV, PARENT_RUN_ENV, finish_execution, start_execution
from pipelines.params import apply_overrides

REPO = Path(__file__).resolve().parents[1]
LOCK_NAME = "clip-flow.lock"
NETWORK_STAGES = frozenset({"collect", "shard", "train", "promote"})
RETRY_DELAYS_S = [10, 60]
OUTPUT_TAIL_BYTES = 65536  # of a stage's output, kept for its error line


class StageFailed(RuntimeError):
    """A stage exited with an error; the message is the stage's own one-line error. `bad_input`: the error is
    one of the project's one-line errors (bad input, a refused resume) or DVC's own, which a retry cannot fix."""

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
def checkout_lock(repo: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive lock on the checkout for a whole flow run; waits up to `timeout_s`, then PipelineBusy."""
    path = repo / ".dvc" / "tmp" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise PipelineBusy(f"another pipeline run holds {path} ({holder}); waited {timeout_s:.0f} s. "
                                       "Wait for it to finish, or raise lock_timeout_s") from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stage_env() -> dict[str, str]:
    """`python` in dvc.yaml's cmds is this interpreter (the project's venv), whatever PATH says."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _one_line_error(output: str) -> str:
    """The stage's own one-line error (pipelines._common prints it last), else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("error:")]
    return (ours or lines or ["the stage failed with no output"])[-1]


def run_dvc_stage(stage: str, repo: Path, echo: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: runs it when DVC says it changed; returns skipped + the metrics.
    `echo`: pass the stage's output (its progress display) through to this process's stderr as it comes."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    proc = subprocess.Popen(cmd, cwd=repo, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail = bytearray()
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        if echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        tail += chunk
        del tail[:-OUTPUT_TAIL_BYTES]
    output = tail.decode("utf-8", "replace")
    if proc.wait() != 0:
        line = _one_line_error(output)
        raise StageFailed(f"stage {stage}: {line}", bad_input=line.startswith(("error:", "ERROR:")))
    skipped = "didn't change, skipping" in output
    metrics_path = repo / "reports" / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {"stage": stage, "skipped": skipped, "metrics": metrics}


def _markdown(outcome: dict[str, Any]) -> str:
    lines = [f"## {outcome['stage']}: {'up to date (skipped)' if outcome['skipped'] else 'ran'}", "",
             "| metric | value |", "|---|---|"]
    for key, value in sorted(outcome["metrics"].items()):
        if isinstance(value, int | float | str | bool):
            lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def _stage_task(stage: str) -> Any:
    @task(name=stage, retries=2 if stage in NETWORK_STAGES else 0, retry_delay_seconds=RETRY_DELAYS_S,
          retry_condition_fn=_worth_retrying)
    def run_stage(repo: str, echo: bool) -> dict[str, Any]:
        outcome = run_dvc_stage(stage, Path(repo), echo)
        get_run_logger().info("%s: %s", stage, "up to date, skipped" if outcome["skipped"] else "ran")
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
             lock_timeout_s: float = 600.0, echo: bool = False,
             data_version: str | None = None, push: str | None = None) -> list[dict[str, Any]]:
    """Run the stages in DAG order through DVC (module docstring); returns one outcome per stage.
    `data_version` (set by the on-new-data trigger): the version the run is for; it is logged, and a warning
    says so when shard.output's latest.json has moved on meanwhile (the run trains on what latest.json names).
    `push`: a DVC remote (e.g. "s3") that every output DVC tracks is pushed to after the stages succeeded."""
    root = Path(repo) if repo else REPO
    chosen = stages or STAGES
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    with checkout_lock(root, lock_timeout_s):
        if overrides:
            apply_overrides(root / "params.yaml", overrides)
        if data_version:
            current = published_version(str(root / "params.yaml"))
            get_run_logger().info("triggered by data version %s (latest.json names %s)", data_version, current)
            if current and current != data_version:
                get_run_logger().warning("latest.json has moved on to %s: training on it", current)
        flow_run_id = str(prefect_runtime.flow_run.id or "") or None
        tracker, parent = start_execution(root, flow_run_id)
        saved = {key: os.environ.get(key) for key in (PARENT_RUN_ENV, FLOW_RUN_ENV)}
        os.environ[PARENT_RUN_ENV] = parent or ""
        os.environ[FLOW_RUN_ENV] = flow_run_id or ""
        outcomes: list[dict[str, Any]] = []
        failed = None
        try:
            for stage in [s for s in STAGES if s in chosen]:
                failed = stage
                outcomes.append(STAGE_TASKS[stage](str(root), echo))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow (each stage through DVC).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", default="", help="comma-separated subset, in DAG order")
    parser.add_argument("--lock-timeout-s", type=float, default=600.0)
    parser.add_argument("--push", default=None, metavar="REMOTE", help="dvc push the outputs to this remote after")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s] or None
    try:
        outcomes = pipeline(overrides=args.overrides, stages=stages, lock_timeout_s=args.lock_timeout_s, echo=True,
                            push=args.push)
    except (StageFailed, PipelineBusy, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(summary(outcomes, REPO))


def summary(outcomes: list[dict[str, Any]], repo: Path) -> str:
    """Where the results are: the evaluation table, the bundle, the MLflow UI, and the champion decision."""
    from clip.config import load_config

    cfg = load_config(repo / "params.yaml")
    lines = ["", "pipeline finished: " + ", ".join(
        f"{o['stage']} ({'up to date' if o['skipped'] else 'ran'})" for o in outcomes)]
    done = {o["stage"]: o for o in outcomes}
    if "evaluate" in done:
        lines.append(f"  evaluation table: {cfg.evaluate.output_dir}/results.md")
    if "export" in done:
        lines.append(f"  bundle:           {cfg.export.output_dir}")
    if cfg.tracking.enabled:
        lines.append(f"  MLflow UI:        mlflow ui --backend-store-uri {cfg.tracking.uri}")
    promote = done.get("promote", {}).get("metrics", {})
    if promote:
        lines.append(f"  decision:         {promote.get('model_name')} v{promote.get('version')} -> "
                     f"{promote.get('decision')} ({promote.get('reason')})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
