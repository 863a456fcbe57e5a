"""The sections every stage may receive beside its own: storage, tracking, compute, and the debug aids."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from clip.config.base import (
    DASK_SCHEDULER_ENV,
    TRACKING_URI_ENV,
    HostPort,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Section,
    _default_tracking_uri,
    _no_credentials,
)


class StorageConfig(Section):
    """Where objects live. Credentials never come from here: boto3's standard chain supplies them."""

    endpoint_url: Annotated[str | None, AfterValidator(_no_credentials)] = Field(
        None, description="S3-compatible endpoint URL (MinIO, Ceph, ...); AWS_ENDPOINT_URL overrides it when set; "
                          "null: AWS S3")
    region: str | None = Field(None, description="S3 region name passed to boto3; null: boto3's own default")
    multipart_threshold_mb: PositiveInt = Field(64, description="objects at least this big (MiB) go up in parts")
    multipart_chunk_mb: PositiveInt = Field(16, description="size (MiB) of each part of a multipart upload")
    max_attempts: PositiveInt = Field(
        8, description="attempts per S3 request, on throttling, 5xx and connection errors")
    backoff_base_s: PositiveFloat = Field(
        0.2, description="base delay (seconds) of the exponential backoff with jitter between attempts")
    max_concurrency: PositiveInt = Field(8, description="parallel part / object uploads")


class TrackingConfig(Section):
    """MLflow tracking of runs (params, metrics, artifacts, data version)."""

    enabled: bool = Field(True, description="log runs to MLflow; false: no tracking at all")
    uri: Annotated[str, AfterValidator(_no_credentials)] = Field(
        default_factory=lambda: _default_tracking_uri(),
        description=f"MLflow tracking URI: a local SQLite store or an http(s):// server; unset: {TRACKING_URI_ENV} "
                    "when set (a team server; its login: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), "
                    "else sqlite:///mlflow.db")
    artifact_location: str | None = Field(
        None, description="artifact root of the experiment; only used when the experiment is created. Unset: "
                          "mlartifacts beside a local store, mlflow-artifacts:/<experiment> on an http(s) server "
                          "(the server's own artifact store, e.g. its --artifacts-destination bucket)")
    experiment: str = Field("clip", description="MLflow experiment name the runs are logged under")
    parent_run_id: str | None = Field(
        None, description="nest every stage run under this MLflow run (set by the pipeline flow for one execution)")
    run_tags: dict[str, str] = Field(
        default_factory=dict, description="extra tags on every stage run (the flow sets the Prefect flow run id)")

    @model_validator(mode="before")
    @classmethod
    def _artifacts_follow_the_store(cls, data: Any) -> Any:
        """An unset artifact_location follows the store, so that pointing MLFLOW_TRACKING_URI at a server is
        enough: a local folder written by this machine would be unreachable for the server's other users."""
        if not isinstance(data, dict) or data.get("artifact_location") is not None:
            return data
        uri = data.get("uri") or os.environ.get(TRACKING_URI_ENV) or ""
        served = isinstance(uri, str) and uri.startswith(("http://", "https://"))
        experiment = data.get("experiment", "clip")
        return {**data, "artifact_location": f"mlflow-artifacts:/{experiment}" if served else "mlartifacts"}


class ComputeConfig(Section):
    """Devices, processes and the Dask cluster the stages run on."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="training device: auto (CUDA when available, else CPU), cpu, or cuda (refused without one)")
    nproc_per_node: PositiveInt = Field(
        1, description="training processes per node (torchrun --nproc-per-node); more than one process in all "
                    "makes the train stage launch torchrun")
    nnodes: PositiveInt = Field(1, description="number of nodes of a training job (torchrun --nnodes)")
    rdzv_endpoint: HostPort = Field(None, description="host:port of the c10d rendezvous for multi-node training")
    node_rank: NonNegativeInt | None = Field(
        None, description="this node's rank in a multi-node training job (torchrun --node-rank); null: assigned by "
                          "the c10d rendezvous")
    max_restarts: NonNegativeInt = Field(
        0, description="torchrun --max-restarts: times the training workers are restarted after a failure (they "
                       "resume from the newest checkpoint); more than 0 makes the train stage launch torchrun")
    dask_scheduler: str | None = Field(
        default_factory=lambda: os.environ.get(DASK_SCHEDULER_ENV) or None,
        description=f"address of an existing Dask cluster (tcp://host:8786); unset: {DASK_SCHEDULER_ENV} when set "
                    "(Dask's own variable), else null; null starts a local cluster")
    dask_workers: PositiveInt = Field(2, description="worker processes of the local Dask cluster")
    threads_per_worker: PositiveInt = Field(1, description="threads per worker of the local Dask cluster")


class DebugConfig(Section):
    """Test and debug aids, read by every training rank. Leave them at their defaults in real runs."""

    keys_log: str | None = Field(
        None, description="test/debug aid: each training rank appends JSON lines to <keys_log>.rank<R>: "
                          "{event: start, from_step, restart} at start and {step, keys} per trained step (the sample "
                          "keys of its part of the global batch); null: off")
    fault_nonfinite_steps: list[PositiveInt] = Field(
        default_factory=list, description="test/debug aid: make the training loss NaN at these 1-based steps "
                                          "(exercises the non-finite loss guard); []: off")
    fault_step_delay_s: Annotated[float, Field(ge=0)] = Field(
        0.0, description="test/debug aid: sleep this many seconds after every training step (tests that kill a "
                         "worker mid-run); 0: off")
