"""Wrong values are refused, not silently accepted, and refusals are one line: strict numbers, duplicate keys in
params.yaml, a missing params file, S3 bucket names, `compute.device=cuda` without a GPU, a typo given to
`clip-pipeline run` (refused before Prefect starts), and the telemetry opt-outs of every entry point."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clip.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("clip-pipeline"))


def _refused(overrides: list[str], *expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for text in expected:
        assert text in str(err.value), str(err.value)


@pytest.mark.parametrize(("override", "expected"), [
    ("train.batch_size=true", "(got True)"),     # lax pydantic made this 1
    ("train.batch_size=1.5", "(got 1.5)"),
    ("train.batch_size=64.0", "(got 64.0)"),     # a float is not an integer, even a whole one
    ("train.lr=true", "(got True)"),             # nor a boolean a number
    ("train.seed=false", "(got False)"),          # lax: 0
])
def test_numbers_are_strict(override: str, expected: str) -> None:
    _refused([override], override.split("=")[0], expected)


def test_numbers_typed_as_yaml_numbers_still_pass(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.batch_size=128", "train.lr=1e-3", "train.weight_decay=0", "train.beta2=2.5e-1"])
    assert cfg.train.batch_size == 128 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0 and cfg.train.beta2 == 0.25
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  batch_size: 32\n  lr: 5e-4\n  epochs: 2\n")
    cfg = load_config(params)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.epochs) == (32, 0.0005, 2)


def test_duplicate_keys_are_refused_naming_key_and_lines(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  batch_size: 8\nshard:\n  seed: 1\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(params)
    assert "duplicate key 'train'" in str(err.value) and "lines 1 and 5" in str(err.value)
    assert str(params) in str(err.value)
    params.write_text("train:\n  batch_size: 8\n  epochs: 1\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'batch_size' at lines 2 and 4"):
        load_config(params)
    # YAML merge keys are not duplicates: the keys written beside `<<` override the merged ones
    params.write_text("shard:\n  <<: {seed: 1, samples_per_shard: 10}\n  seed: 2\n")
    assert load_config(params).shard.seed == 2


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_missing_params_file_is_said_or_refused(tmp_path: Path) -> None:
    proc = _run([CLI, "config", "show"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"note: no params.yaml in {tmp_path}: using the built-in defaults"]
    # named explicitly, even as params.yaml: a missing file is an error, not the defaults
    for name in ("params.yaml", "other.yaml"):
        proc = _run([CLI, "config", "show", "--params", name], tmp_path)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.strip().splitlines() == [f"error: params file {name} does not exist (--params)"]


@pytest.mark.parametrize("bucket", ["bad bucket!!", "ab", "a" * 64, "Upper", "-start", "end-", "under_score"])
def test_s3_bucket_names_are_checked(bucket: str) -> None:
    for key in ("shard.output", "train.data", "collect.output_dir", "export.output_dir"):
        _refused([f"{key}=s3://{bucket}/x"], key, f"invalid S3 bucket name {bucket!r}")


def test_valid_bucket_names_pass() -> None:
    cfg = load_config(None, ["shard.output=s3://abc/x", "train.data=s3://my-bucket.v2-01/shards", "train.output=s3://"
                             + "b" * 63])
    assert cfg.shard.output == "s3://abc/x" and cfg.train.output == "s3://" + "b" * 63


def test_storage_errors_keep_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket name past the config (a URI built at runtime): botocore's reason is on its message's second line,
    which used to be cut off."""
    from clip import storage
    from clip.config import StorageConfig

    with socket.socket() as s:  # a loopback port nobody listens on: nothing leaves this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", "testing"),
                       ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("s3://bad bucket!!/x/latest.json", StorageConfig(max_attempts=1))
    assert "Parameter validation failed" in str(err.value) and 'Invalid bucket name "bad bucket!!"' in str(err.value)


def test_cuda_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    import torch

    from clip.compute import DeviceUnavailable, resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for local_rank in (0, 3):
        with pytest.raises(DeviceUnavailable, match="compute.device is 'cuda' but no CUDA device is available"):
            resolve_device("cuda", local_rank)
        assert resolve_device("auto", local_rank) == resolve_device("cpu", local_rank) == torch.device("cpu")
    proc = _run([CLI, "train", "--set", "compute.device=cuda"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "│" not in proc.stderr, proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "DeviceUnavailable: compute.device is 'cuda' but no CUDA device is available" in error


def test_run_with_a_typo_is_refused_before_prefect_starts(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home)}
    for cmd in ([CLI, "run", "--set", "train.no_such_key=1"],
                [sys.executable, "-m", "flows.pipeline", "--set", "train.no_such_key=1"]):
        proc = _run(cmd, REPO, env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "error: invalid configuration: train.no_such_key: unknown key (value 1)"], proc.stderr
        assert "prefect" not in (proc.stdout + proc.stderr).lower()  # no server start, no flow run, no traceback
        assert list(home.iterdir()) == []  # Prefect wrote nothing: no database, no profile


TELEMETRY = {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.mark.parametrize("entry", ["pipelines.cli", "pipelines.promote", "flows.pipeline"])
def test_entry_points_set_the_telemetry_opt_outs(entry: str) -> None:
    """Without `make` (which exports them), each entry point sets the opt-outs before Prefect and MLflow read them:
    the libraries themselves report telemetry off. A value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY}
    probe = (f"import {entry}, os\n"
             "from prefect.settings import get_current_settings\n"
             "from mlflow.telemetry.utils import is_telemetry_disabled\n"
             f"print([os.environ.get(k) for k in {list(TELEMETRY)}], get_current_settings().server.analytics_enabled,"
             " is_telemetry_disabled())")
    proc = _run([sys.executable, "-c", probe], REPO, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == f"{list(TELEMETRY.values())} False True"


def test_telemetry_opt_outs_keep_what_the_user_set() -> None:
    proc = _run([sys.executable, "-c", "import pipelines, os; print(os.environ['DO_NOT_TRACK'])"], REPO,
                {**os.environ, "DO_NOT_TRACK": "0"})
    assert proc.stdout.strip() == "0"
