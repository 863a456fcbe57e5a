"""The MLflow model registry, as the promote stage uses it: a bundle logged and registered as a new model version,
and the aliases and version tags the promotion rule reads and moves.

The bundle is logged as a pyfunc model (clip.runtime.pyfunc: servable by `mlflow models serve` without torch)
through MLflow's fluent API, pointed at `tracking.uri` only for the duration of the call (`_fluent_store`), so no
process-wide MLflow state outlives it. Everything else goes through an `MlflowClient` on `tracking.uri`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from clip.config import StorageConfig, TrackingConfig
from clip.tracking import Tracker


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
                       storage_cfg: StorageConfig | None = None) -> str:
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

    def find_version(self, name: str, tags: Mapping[str, str]) -> str | None:
        """The newest version of `name` whose tags include all of `tags` (a promotion already recorded), or None.
        The search filters on `checkpoint_sha256` in the store; the other tags are compared here."""
        sha = tags.get("checkpoint_sha256")
        if not sha or "'" in name or "'" in sha:
            return None  # nothing to match on (a bundle without its checkpoint's hash), or not quotable
        found = self.client.search_model_versions(f"name='{name}' and tags.checkpoint_sha256='{sha}'")
        matching = [int(v.version) for v in found if all((v.tags or {}).get(k) == str(val) for k, val in tags.items())]
        return str(max(matching)) if matching else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def describe(self, name: str, version: str, description: str) -> None:
        self.client.update_model_version(name, version, description=description)

    def version_aliases(self, name: str, version: str) -> list[str]:
        return list(self.client.get_model_version(name, version).aliases or [])
