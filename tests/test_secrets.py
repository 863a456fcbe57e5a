"""Credentials in an endpoint URL (`AWS_ENDPOINT_URL=http://user:PASSWORD@host:port`) never reach a message, a log
line, a traceback, the MLflow store or Prefect's database: clip/storage/redact.py and where it is applied.

The endpoint is a loopback port that was bound and closed (nothing listens), so every S3 request fails with a
connection error whose botocore text quotes the full URL, password included.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clip.storage.redact import install_log_redaction, redact

REPO = Path(__file__).resolve().parents[1]
SENTINEL = f"SentinelPw{uuid.uuid4().hex}"  # made here, so no file holds it unless a run wrote it
CLI = str(Path(sys.executable).with_name("clip-pipeline"))
FEW_RETRIES = ["--set", "storage.max_attempts=2", "--set", "storage.backoff_base_s=0.01"]


@pytest.fixture
def dead_endpoint() -> tuple[str, int]:
    """(endpoint URL carrying SENTINEL as its password, port): a loopback port bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://admin:{SENTINEL}@127.0.0.1:{port}", port


def _env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLIP_PIPELINE_DEBUG", "MLFLOW_TRACKING_URI")}
    return {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", **extra}


def _files_containing(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_redact_masks_url_credentials_and_secret_parameters() -> None:
    text = (f'Could not connect to the endpoint URL: "http://admin:{SENTINEL}@127.0.0.1:9000/bucket/k"; '
            f"mlflow at https://user:{SENTINEL}@mlflow.example:5000/api, "
            f"presigned s3.example/b/k?X-Amz-Credential={SENTINEL}&X-Amz-Signature={SENTINEL}&partNumber=2, "
            f"dsn password={SENTINEL} token={SENTINEL}")
    clean = redact(text)
    assert SENTINEL not in clean and "admin" not in clean
    # what failed stays readable: scheme, host, port, path, the harmless parameters
    for kept in ('"http://***@127.0.0.1:9000/bucket/k"', "https://***@mlflow.example:5000/api", "partNumber=2",
                 "X-Amz-Signature=***", "password=***"):
        assert kept in clean, clean
    plain = "GET s3://bucket/x/latest.json failed: http://127.0.0.1:9000/bucket/x (user@example.com wrote it)"
    assert redact(plain) == plain


def test_cli_errors_retry_warnings_and_tracebacks_hide_the_endpoint_password(
        tmp_path: Path, dead_endpoint: tuple[str, int]) -> None:
    endpoint, port = dead_endpoint
    (tmp_path / "params.yaml").write_text(
        "shard:\n  output: s3://secret-test/shards\n"
        "train:\n  data: s3://secret-test/shards\n"
        f"tracking:\n  uri: sqlite:///{tmp_path / 'mlflow.db'}\n  artifact_location: {tmp_path / 'mlartifacts'}\n")
    runs = {
        "data list": [CLI, "data", "list", *FEW_RETRIES],
        "train": [CLI, "train", *FEW_RETRIES],
        "python -m pipelines.train": [sys.executable, "-m", "pipelines.train", *FEW_RETRIES],
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(endpoint), capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 1, f"{name}: {output}"
        assert SENTINEL not in output, f"{name} printed the password:\n{output}"
        # the user still sees which endpoint failed, in the error and in every retry warning
        assert f"http://***@127.0.0.1:{port}/" in proc.stderr and "attempt 1/2 failed" in proc.stderr, output
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr, output
    # the full traceback (CLIP_PIPELINE_DEBUG=1, or any crash) is redacted too, botocore's chained error included
    proc = subprocess.run(runs["data list"], cwd=tmp_path, env=_env(endpoint, CLIP_PIPELINE_DEBUG="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "EndpointConnectionError" in proc.stderr
    assert SENTINEL not in proc.stdout + proc.stderr, proc.stderr
    # nothing the runs wrote (MLflow store and artifacts if opened, reports, logs) holds it either
    assert _files_containing(tmp_path, SENTINEL.encode()) == []


def test_config_refuses_credentials_in_urls_without_echoing_them() -> None:
    from clip.config import ConfigError, load_config

    for key in ("storage.endpoint_url", "tracking.uri"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}=http://admin:{SENTINEL}@127.0.0.1:9000"])
        assert key in str(err.value) and "credentials" in str(err.value) and SENTINEL not in str(err.value)


@pytest.fixture
def log_redaction() -> Iterator[None]:
    """install_log_redaction() for one test; the record factory it replaced is put back afterwards."""
    saved = logging.getLogRecordFactory()
    install_log_redaction()
    try:
        yield
    finally:
        logging.setLogRecordFactory(saved)


def test_log_records_of_every_logger_are_redacted(log_redaction: None, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://admin:{SENTINEL}@127.0.0.1:9"
    with caplog.at_level(logging.WARNING):
        logging.getLogger("clip.storage").warning("GET %s failed", url)
        logging.getLogger("botocore.endpoint").warning(f"retrying {url}")
        try:
            raise ConnectionError(f"Could not connect to {url}/b/k")
        except ConnectionError:
            logging.getLogger("prefect.task_runs").exception("task failed")
    assert len(caplog.records) == 3
    assert SENTINEL not in caplog.text and "http://***@127.0.0.1:9" in caplog.text, caplog.text
    assert "Could not connect to http://***@127.0.0.1:9/b/k" in caplog.text  # the exception's traceback


def test_prefect_run_logs_are_redacted(log_redaction: None, prefect_harness: None) -> None:
    """A flow's run logger ships records to Prefect's API (its database): they arrive redacted."""
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    @flow(name="secret-log-check")
    def leaky() -> str:
        from prefect.runtime import flow_run

        get_run_logger().warning("could not reach http://admin:%s@127.0.0.1:9/bucket", SENTINEL)
        return str(flow_run.id)

    run_id = leaky()
    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    messages = [log.message for log in logs]
    assert any("http://***@127.0.0.1:9/bucket" in m for m in messages), messages
    assert not any(SENTINEL in m for m in messages), messages


@pytest.mark.heavy
def test_failed_flow_keeps_the_password_out_of_prefect_and_mlflow(
        tmp_path: Path, prefect_harness: None, dead_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline flow with a stage that fails on the dead endpoint: the flow fails naming the endpoint, and
    neither Prefect's database (task and flow states, logs) nor the MLflow store (the execution's parent run)
    holds the password."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from flows.pipeline import StageFailed, pipeline
    from pipelines.params import apply_overrides
    from tests.test_flow import repo_copy

    endpoint, port = dead_endpoint
    repo = repo_copy(tmp_path / "repo")
    apply_overrides(repo / "params.yaml", [
        "collect.synthetic.num_samples=16", "collect.synthetic.image_size=32", "collect.output_dir=s3://secret-test/raw",
        "storage.max_attempts=2", "storage.backoff_base_s=0.01"])
    for key, value in _env(endpoint).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StageFailed) as failed:
        pipeline(repo=str(repo), stages=["collect"])
    assert f"127.0.0.1:{port}" in str(failed.value) and SENTINEL not in str(failed.value), str(failed.value)
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    database = Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    prefect_files = [p for p in database.parent.glob(database.name + "*") if p.is_file()]  # the db, its WAL
    assert prefect_files and not [p for p in prefect_files if SENTINEL.encode() in p.read_bytes()]
    assert (repo / "mlflow.db").exists()  # the execution's parent run was recorded (FAILED)
    assert _files_containing(repo, SENTINEL.encode()) == []  # mlflow.db, mlartifacts, reports, .dvc/tmp
