"""The project's DVC remotes: the default local folder, and the S3 remote (`s3` in .dvc/config), whose push / pull
round trip runs here against a real S3 API (moto's server on 127.0.0.1), as `dvc push -r s3` would against AWS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dvc(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout


def _repo_with_project_dvc_config(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    _dvc(path, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", path / ".dvc" / "config")  # the remotes as the project ships them
    return path


def test_default_remote_is_a_local_folder_inside_the_checkout(tmp_path: Path) -> None:
    repo = _repo_with_project_dvc_config(tmp_path / "repo")
    remotes = _dvc(repo, "remote", "list")
    assert "local" in remotes and "s3://" in remotes
    (repo / "data.bin").write_bytes(os.urandom(4096))
    _dvc(repo, "add", "data.bin")
    _dvc(repo, "push")  # the default remote: no setup needed
    assert any((repo / ".dvc-store").rglob("*")), "nothing pushed to the local remote"


def test_s3_remote_push_and_pull_round_trip(tmp_path: Path, s3_bucket: str, s3_server: str) -> None:
    repo = _repo_with_project_dvc_config(tmp_path / "repo")
    # Point the project's `s3` remote at the test bucket and server (config.local: never committed).
    _dvc(repo, "remote", "modify", "--local", "s3", "url", f"s3://{s3_bucket}/dvc")
    _dvc(repo, "remote", "modify", "--local", "s3", "endpointurl", s3_server)
    payload = os.urandom(200_000)
    (repo / "data").mkdir()
    (repo / "data" / "shard.tar").write_bytes(payload)
    (repo / "data" / "latest.json").write_text('{"data_version": "v1"}\n')
    _dvc(repo, "add", "data")
    _dvc(repo, "push", "-r", "s3")
    import boto3

    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket, Prefix="dvc/")
    assert listed.get("KeyCount", 0) >= 3  # the two files and the directory listing
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull", "-r", "s3")
    assert (repo / "data" / "shard.tar").read_bytes() == payload
    assert "in sync" in _dvc(repo, "status", "-c", "-r", "s3")
