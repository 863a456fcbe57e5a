"""MLflow helpers shared by the training, export, evaluation and promotion stages.

    tracker = Tracker(cfg.tracking)                 # enabled=False (or not rank 0): every call is a no-op
    tracker.start("train", params=cfg.model_dump(), tags={"data_version": v})
    tracker.log_metrics({"loss": 1.2}, step=10)
    tracker.log_artifact("models/checkpoints/final.pt")
    tracker.end()                                   # or use `with tracker.run(...)`

Runs are created through `MlflowClient` on `tracking.uri` (no process-wide MLflow state is changed). The
experiment is created with `tracking.artifact_location` when it does not exist yet. Params are the config
flattened to dotted keys. The git commit of the working tree (when in a git repository) is a tag, and so is the
process that owns the run (`clip.host`, `clip.pid`, `clip.pid_start`): a run whose process died without ending it
(SIGKILL, a lost machine) stays RUNNING in MLflow, and `fail_abandoned_runs` marks such runs of this host FAILED.
Every run is new: a run is never reopened (a resumed training segment is a run of its own, linked to the earlier
ones by its tags; clip/train/stage.py). The model registry (registering an export bundle, aliases) is the promote
stage's alone: clip/promote/registry.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clip.config import TrackingConfig

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch call
HOST_TAG, PID_TAG, PID_START_TAG = "clip.host", "clip.pid", "clip.pid_start"  # the process that owns a run
FAILED_REASON_TAG = "clip.failed_reason"  # why a run ended FAILED when its own process could not say it


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1, "tokenizer": {"kind": "train"}}} -> {"train.lr": "0.1", "train.tokenizer.kind": "train"}."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name + "."))
        else:
            text = "" if value is None else str(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def git_commit(path: str | Path = ".") -> str | None:
    """HEAD's commit of the git repository containing `path`, or None (not a repository, no git)."""
    try:
        result = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the 3rd (state) on, or None (no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and ")"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, field 22); with the pid it names one process: a pid
    given to a new process since has another start."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def pid_host() -> str:
    """Where this process's pids mean something: the host name, and its pid namespace when /proc tells (two
    containers may share a host name, never a pid namespace)."""
    try:
        return f"{socket.gethostname()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def owner_tags() -> dict[str, str | None]:
    """This process, as the tags of a run it owns (HOST_TAG, PID_TAG, PID_START_TAG)."""
    return {HOST_TAG: pid_host(), PID_TAG: str(os.getpid()), PID_START_TAG: _process_start(os.getpid())}


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this host runs: not gone, not a zombie, and (when `started` is given and /proc
    tells) the process that started then rather than a later one given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    return fields[0] != "Z" and (started is None or fields[19] == started)


def is_uri(location: str) -> bool:
    """`scheme:...`, not a path: s3://, file:, and mlflow-artifacts:/clip (one slash: the tracking server's own
    artifact store). A scheme has two characters at least, so a Windows drive letter stays a path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", location) is not None


def artifact_location_uri(location: str) -> str:
    """A local folder becomes an absolute file: URI (MLflow stores it verbatim); URIs pass through."""
    if is_uri(location):
        return location
    return Path(location).resolve().as_uri()


class Tracker:
    """One MLflow run, or nothing at all when tracking is disabled / this is not the logging process."""

    def __init__(self, cfg: TrackingConfig, active: bool = True) -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.enabled and active)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: Any = None
        self._pending: list[Any] = []  # asynchronous metric writes, waited for when the run ends

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.cfg.uri)
        return self._client

    def ensure_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(
                self.cfg.experiment, artifact_location=artifact_location_uri(self.cfg.artifact_location))
        except Exception:  # created meanwhile by another process
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str | None] | None = None) -> str | None:
        """Open a new run (nested under `tracking.parent_run_id` when set), tagged with its owner process."""
        if not self.enabled:
            return None
        from mlflow.entities import Param

        self.experiment_id = self.ensure_experiment()
        # The commit of the code that runs (this package's checkout), not of wherever the command was started.
        all_tags = {"git_commit": git_commit(Path(__file__).resolve().parent), **owner_tags(), **self.cfg.run_tags}
        if self.cfg.parent_run_id:  # one pipeline execution = one parent run, a nested run per stage
            all_tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        all_tags.update(tags or {})
        clean_tags = {k: str(v) for k, v in all_tags.items() if v is not None}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=clean_tags)
        self.run_id = run.info.run_id
        flat = list(flatten_params(params or {}).items())
        for start in range(0, len(flat), PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in flat[start:start + PARAMS_PER_BATCH]]
            self.client.log_batch(self.run_id, params=batch)
        return self.run_id

    def fail_abandoned_runs(self) -> list[str]:
        """End FAILED every RUNNING run of the experiment whose owner process on this host is gone (killed before
        it could end its run), with FAILED_REASON_TAG saying so; returns their ids. Runs of other hosts, and runs
        without owner tags, are left alone: whether their process lives cannot be told from here."""
        if not self.enabled:
            return []
        experiment_id = self.ensure_experiment()
        host = pid_host()
        running = self.client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = "
                                                           f"'{host}'", max_results=1000)
        failed = []
        for run in running:
            tags = run.data.tags
            if not tags.get(PID_TAG, "").isdigit() or process_alive(int(tags[PID_TAG]), tags.get(PID_START_TAG)):
                continue
            self.client.set_tag(run.info.run_id, FAILED_REASON_TAG,
                                f"process {tags[PID_TAG]} on {host} ended without finishing this run (killed?); "
                                f"marked FAILED by process {os.getpid()}")
            self.client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(run.info.run_id)
        return failed

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            # Asynchronous: a training step does not wait for the tracking store (logged every step by default).
            operation = self.client.log_batch(self.run_id, metrics=batch, synchronous=False)
            if operation is not None:
                self._pending.append(operation)

    def flush(self) -> None:
        """Wait until every metric logged so far is in the tracking store."""
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or self.run_id is None:
            return
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A table (columns -> values) the MLflow UI shows and compares across runs (`mlflow.log_table`)."""
        if not self.enabled or self.run_id is None:
            return
        self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """An artifact from bytes (a plot PNG, a report) under `artifact_file` (folder/name)."""
        if not self.enabled or self.run_id is None:
            return
        import tempfile

        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="clip-artifact-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self.run_id is None:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    @contextlib.contextmanager
    def run(self, run_name: str, params: Mapping[str, Any] | None = None,
            tags: Mapping[str, str | None] | None = None) -> Iterator[Tracker]:
        """`with tracker.run(...)`: the run ends FINISHED, or FAILED when the body raises."""
        self.start(run_name, params, tags)
        try:
            yield self
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")
