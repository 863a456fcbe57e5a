"""MLflow helpers shared by the training, export, evaluation and promotion stages.

    tracker = Tracker(cfg.tracking)                 # enabled=False (or not rank 0): every call is a no-op
    tracker.start("train", params=cfg.model_dump(), tags={"data_version": v})
    tracker.log_metrics({"loss": 1.2}, step=10)
    tracker.log_artifact("models/checkpoints/final.pt")
    tracker.end()                                   # or use `with tracker.run(...)`

Runs are created through `MlflowClient` on `tracking.uri` (no process-wide MLflow state is changed). The
experiment is created with `tracking.artifact_location` when it does not exist yet. Params are the config
flattened to dotted keys. The git commit of the working tree (when in a git repository) is a tag.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clip.config import TrackingConfig

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch call


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


def artifact_location_uri(location: str) -> str:
    """A local folder becomes an absolute file: URI (MLflow stores it verbatim); URIs pass through."""
    if "://" in location or location.startswith("file:"):
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

    def _resumable(self, run_id: str | None) -> bool:
        """Whether `run_id` names a run of this experiment in this store (a resume continues it)."""
        if not run_id:
            return False
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except MlflowException:  # another tracking store, or the run was deleted: start a new one
            return False

    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str | None] | None = None, resume_run_id: str | None = None) -> str | None:
        """Open the run: a new one, or, when `resume_run_id` names a run of this experiment (a training run
        resumed from its checkpoint), that run again, so its metrics continue on one curve. A continued run
        keeps the params it was started with (MLflow params are immutable); the tags are updated."""
        if not self.enabled:
            return None
        from mlflow.entities import Param, RunStatus

        self.experiment_id = self.ensure_experiment()
        # The commit of the code that runs (this package's checkout), not of wherever the command was started.
        all_tags = {"git_commit": git_commit(Path(__file__).resolve().parent), **self.cfg.run_tags}
        if self.cfg.parent_run_id:  # one pipeline execution = one parent run, a nested run per stage
            all_tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        all_tags.update(tags or {})
        clean_tags = {k: str(v) for k, v in all_tags.items() if v is not None}
        if self._resumable(resume_run_id):
            assert resume_run_id is not None
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for key, value in clean_tags.items():
                self.client.set_tag(resume_run_id, key, value)
            return self.run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=clean_tags)
        self.run_id = run.info.run_id
        flat = list(flatten_params(params or {}).items())
        for start in range(0, len(flat), PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in flat[start:start + PARAMS_PER_BATCH]]
            self.client.log_batch(self.run_id, params=batch)
        return self.run_id

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
            tags: Mapping[str, str | None] | None = None, resume_run_id: str | None = None) -> Iterator[Tracker]:
        """`with tracker.run(...)`: the run ends FINISHED, or FAILED when the body raises."""
        self.start(run_name, params, tags, resume_run_id)
        try:
            yield self
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")


@contextlib.contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (what `mlflow.pyfunc.log_model` uses) pointed at `uri` for the duration, then put back
    exactly as it was: the module-level URIs MLflow keeps (None when unset) and the environment variables it exports
    are restored, so an unset registry URI stays unset (and keeps following the tracking URI) afterwards."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    env_names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # set_*_uri export these too (for subprocesses)
    saved_env = {name: os.environ.get(name) for name in env_names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_bundle_version(tracker: Tracker, bundle_dir: str, registered_name: str, tags: Mapping[str, Any],
                       storage_cfg: Any = None) -> str:
    """Log the export bundle as a pyfunc model (clip.runtime.pyfunc, no torch when served) in the tracker's open
    run, register it as a new version of `registered_name`, tag the version; returns the version number."""
    import mlflow

    from clip.runtime.mlflow_model import log_bundle_model

    if not tracker.enabled or tracker.run_id is None:
        raise ValueError("registering a model needs MLflow tracking (tracking.enabled: true)")
    with _fluent_store(tracker.cfg.uri), mlflow.start_run(run_id=tracker.run_id):
        info = log_bundle_model(bundle_dir, name="model", storage_cfg=storage_cfg,
                                registered_model_name=registered_name)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        if value is not None:
            tracker.client.set_model_version_tag(registered_name, version, key, str(value))
    return version


class Registry:
    """The MLflow model registry of `tracking.uri`: aliases (MLflow 3: aliases, not stages) and version tags."""

    def __init__(self, cfg: TrackingConfig) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.uri, registry_uri=cfg.uri)

    def alias_version(self, name: str, alias: str) -> tuple[str, dict[str, str]] | None:
        """(version, its tags) holding `alias` of registered model `name`, or None when nobody holds it."""
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return str(version.version), dict(version.tags or {})

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def describe(self, name: str, version: str, description: str) -> None:
        self.client.update_model_version(name, version, description=description)

    def version_aliases(self, name: str, version: str) -> list[str]:
        return list(self.client.get_model_version(name, version).aliases or [])
