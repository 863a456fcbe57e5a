"""The Prefect flow over the DVC stages (flows/pipeline.py), on a temporary copy of this repository: Prefect's own
runtime (the session's ephemeral backend), real `dvc repro` subprocesses, real stages on tiny settings.

Checks: a first run runs every stage; a second run with nothing changed skips every stage; a changed `train.*`
value reruns train and what follows only; `dvc status` agrees with the flow; a second flow run on a checkout that
another one holds is refused, naming the lock; the flow's overrides keep params.yaml's comments.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipelines.params import apply_overrides
from tests.support.servers import free_port, wait_until_up

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "collect.synthetic.num_samples=192", "collect.synthetic.image_size=32", "collect.samples_per_shard=64",
    "shard.samples_per_shard=50", "train.batch_size=32", "train.epochs=1", "train.num_workers=0",
    "train.warmup_steps=2", "train.checkpoint_every=4", "train.tokenizer.vocab_size=600",
    "train.model_overrides={image_size: 32, vision_layers: 1, text_layers: 1}",
]


def repo_copy(dest: Path) -> Path:
    """The files git would commit (tracked + untracked, not ignored), as a fresh git repository."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if name == "dvc.lock":  # this checkout's own record of what ran here; the copy starts fresh
            continue
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def _dvc_status(repo: Path) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real `mlflow server` process on 127.0.0.1 (SQLite backend, artifacts served from `folder`)."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, folder / "server.log", timeout_s=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.heavy
def test_flow_runs_through_dvc_skips_what_did_not_change(tmp_path: Path, prefect_harness: None, s3_bucket: str,
                                                         s3_server: str) -> None:
    with mlflow_server(tmp_path / "mlflow") as tracking_uri:
        _flow_checks(tmp_path, tracking_uri, s3_bucket, s3_server)


def _flow_checks(tmp_path: Path, tracking_uri: str, bucket: str, endpoint: str) -> None:
    from flows.pipeline import PipelineBusy, StageFailed, checkout_lock, pipeline

    repo = repo_copy(tmp_path / "repo")
    apply_overrides(repo / "params.yaml", TINY + [f"tracking.uri={tracking_uri}"])
    for key, value in (("url", f"s3://{bucket}/dvc"), ("endpointurl", endpoint)):  # the project's S3 remote
        subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "s3", key, value], cwd=repo,
                       check=True, capture_output=True)
    stages = ["collect", "dedup", "shard", "train", "export", "evaluate", "promote"]
    stages = [s for s in stages if (REPO / "pipelines" / f"{s}.py").exists()]

    first = pipeline(repo=str(repo), stages=stages, push="s3")
    assert [o["stage"] for o in first] == stages and not any(o["skipped"] for o in first)
    assert (repo / "dvc.lock").exists() and "up to date" in _dvc_status(repo)
    # every tracked output (data versions, runs, bundle, evaluation) is on the S3 remote, in sync with the cache
    in_sync = subprocess.run([sys.executable, "-m", "dvc", "status", "-c", "-r", "s3"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout
    assert "in sync" in in_sync, in_sync
    # `dvc plots show` draws the loss curve (and the evaluation bars) from what the stages wrote
    out = tmp_path / "plots"
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], cwd=repo, check=True,
                   capture_output=True)
    html = (out / "index.html").read_text()
    assert "train_loss" in html and '"loss"' in html and "evaluation" in html

    # MLflow lineage: the execution's parent run holds the stage metrics; each stage run is nested under it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("clip").experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "pipeline"]
    [train] = [r for r in runs if r.info.run_name == "train"]
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert train.data.tags["dvc_stage"] == "train" and len(train.data.tags["params_hash"]) == 16
    assert train.data.tags["prefect_flow_run_id"] == parent.data.tags["prefect_flow_run_id"]
    assert parent.data.tags["data_version"] == train.data.tags["data_version"]
    assert parent.data.metrics["train.steps"] > 0 and parent.info.status == "FINISHED"
    if "promote" in stages:  # the registered version of this execution holds the champion alias
        champion = client.get_model_version_by_alias("clip-tiny-vit", "champion")
        assert champion.tags["data_version"] == train.data.tags["data_version"]

    second = pipeline(repo=str(repo), stages=stages)
    assert all(o["skipped"] for o in second), second

    third = pipeline(repo=str(repo), stages=stages, overrides=["train.epochs=2"], save_overrides=True)
    ran = [o["stage"] for o in third if not o["skipped"]]
    assert ran == [s for s in stages if stages.index(s) >= stages.index("train")], ran
    text = (repo / "params.yaml").read_text()
    assert "epochs: 2" in text and "# global, across all ranks" in text  # comments kept

    with checkout_lock(repo, timeout_s=1), pytest.raises(PipelineBusy, match="clip-flow.lock"):
        pipeline(repo=str(repo), stages=stages, lock_timeout_s=1)

    # a failing stage fails the flow run with the stage's one-line error; its MLflow run and the parent are FAILED
    with pytest.raises(StageFailed, match=r"stage train: error: train: NonFiniteLossError: .*max_nonfinite_steps"):
        pipeline(repo=str(repo), stages=stages, overrides=[
            "train.epochs=3", "train.max_nonfinite_steps=1",
            f"debug.fault_nonfinite_steps={list(range(1, 100))}"])  # whichever step the resumed run starts at
    runs = client.search_runs([client.get_experiment_by_name("clip").experiment_id],
                              order_by=["attributes.start_time DESC"])
    latest_train = next(r for r in runs if r.info.run_name == "train")
    latest_parent = next(r for r in runs if r.info.run_name == "pipeline")
    assert latest_train.info.status == "FAILED"
    assert latest_parent.info.status == "FAILED" and latest_parent.data.tags["failed_stage"] == "train"
