"""Fixtures shared by the whole suite: a real S3 API over HTTP on loopback, a throwaway MLflow store,
and the environment that lets Prefect flows run without a server.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Prefect: a private home and an ephemeral server per test session; nothing phones home.
_PREFECT_HOME = tempfile.mkdtemp(prefix="prefect-home-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_API_ENABLE_HTTP2", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# MLflow and friends must not try the network.
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint); yields its endpoint URL.

    Credentials are fake and set through the standard environment variables, as the storage layer reads them.
    """
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh bucket on the moto server; yields its name. AWS_ENDPOINT_URL points at the server meanwhile."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = s3_server
    try:
        yield name
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved


@pytest.fixture
def mlflow_store(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A throwaway MLflow tracking store: SQLite database + artifact folder under tmp_path.

    Yields {"uri": "sqlite:///...", "artifact_location": "..."} and points MLFLOW_TRACKING_URI at it meanwhile.
    """
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = tmp_path / "mlartifacts"
    artifacts.mkdir()
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield {"uri": uri, "artifact_location": str(artifacts)}
    finally:
        mlflow.set_tracking_uri(None)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One ephemeral Prefect backend for the whole session (the first flow run creates its database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def s3_faults(s3_server: str) -> Iterator[Any]:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto server (see tests/support/s3faults.py).

    Yields a `FaultProxy`: `.endpoint` (URL to use as endpoint_url / AWS_ENDPOINT_URL),
    `.add(method="PUT", path_regex=r"partNumber=2", action="503"|"500"|"slowdown"|"429"|"403"|"drop"|
    "drop_mid_body"|"drop_response"|"truncate_response"|"corrupt", times=1, skip=0)`,
    `.count(method, path_regex)` (requests seen), `.pending()`, `.clear()`, `.reset_counts()`, `.requests`.
    """
    from tests.support.s3faults import FaultProxy

    with FaultProxy(s3_server) as proxy:
        yield proxy


@pytest.fixture
def s3_faulty_bucket(s3_bucket: str, s3_faults: Any) -> Iterator[tuple[str, Any]]:
    """A fresh bucket reached through the fault proxy: yields (bucket, proxy); AWS_ENDPOINT_URL points at the proxy."""
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = s3_faults.endpoint
    try:
        yield s3_bucket, s3_faults
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
