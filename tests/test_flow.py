"""The Prefect flow over the DVC stages (flows/pipeline.py), on a temporary copy of this repository: Prefect's own
runtime (the session's ephemeral backend), real `dvc repro` subprocesses, real stages on tiny settings.

Checks: a first run runs every stage; a second run with nothing changed skips every stage; a changed `train.*`
value reruns train and what follows only; `dvc status` agrees with the flow; a second flow run on a checkout that
another one holds is refused, naming the lock; the flow's overrides keep params.yaml's comments.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.params import apply_overrides

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


@pytest.mark.heavy
def test_flow_runs_through_dvc_skips_what_did_not_change(tmp_path: Path, prefect_harness: None) -> None:
    from flows.pipeline import PipelineBusy, checkout_lock, pipeline

    repo = repo_copy(tmp_path / "repo")
    apply_overrides(repo / "params.yaml", TINY)
    stages = ["collect", "dedup", "shard", "train", "export", "evaluate", "promote"]
    stages = [s for s in stages if (REPO / "pipelines" / f"{s}.py").exists()]

    first = pipeline(repo=str(repo), stages=stages)
    assert [o["stage"] for o in first] == stages and not any(o["skipped"] for o in first)
    assert (repo / "dvc.lock").exists() and "up to date" in _dvc_status(repo)

    # MLflow lineage: the execution's parent run holds the stage metrics; each stage run is nested under it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("clip").experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "pipeline"]
    [train] = [r for r in runs if r.info.run_name == "train"]
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert train.data.tags["dvc_stage"] == "train" and len(train.data.tags["params_hash"]) == 16
    assert train.data.tags["prefect_flow_run_id"] == parent.data.tags["prefect_flow_run_id"]
    assert parent.data.tags["data_version"] == train.data.tags["data_version"]
    assert parent.data.metrics["train.steps"] > 0 and parent.info.status == "FINISHED"

    second = pipeline(repo=str(repo), stages=stages)
    assert all(o["skipped"] for o in second), second

    third = pipeline(repo=str(repo), stages=stages, overrides=["train.epochs=2"])
    ran = [o["stage"] for o in third if not o["skipped"]]
    assert ran == [s for s in stages if stages.index(s) >= stages.index("train")], ran
    text = (repo / "params.yaml").read_text()
    assert "epochs: 2" in text and "# global, across all ranks" in text  # comments kept

    with checkout_lock(repo, timeout_s=1), pytest.raises(PipelineBusy, match="clip-flow.lock"):
        pipeline(repo=str(repo), stages=stages, lock_timeout_s=1)
