"""The per-epoch learning curve (train.zeroshot_sets): mean loss and zero-shot top-1 per synthetic set after every
epoch, in MLflow, in the run folder's epoch_curve.csv and in reports/plots/train_epochs.csv (`dvc plots`)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from clip.config import load_config
from tests.support.shards import make_shards
from tests.support.train_config import tiny_overrides


def test_every_epoch_logs_its_loss_and_zero_shot_accuracy_per_set(tmp_path: Path, mlflow_store: dict[str, str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.train import run

    monkeypatch.chdir(tmp_path)  # reports/plots/ is written relative to the working folder
    make_shards(tmp_path / "shards", n=64, per_shard=32)
    out = tmp_path / "out"
    cfg = load_config(None, tiny_overrides(str(tmp_path / "shards"), str(out), **{
        "train.epochs": 3, "train.zeroshot_sets": "[synthetic-shapes, synthetic-colors]",
        "tracking.enabled": True, "tracking.uri": mlflow_store["uri"],
        "tracking.artifact_location": mlflow_store["artifact_location"], "tracking.experiment": "t"}))
    run(cfg)

    rows = list(csv.DictReader((out / "epoch_curve.csv").open()))
    assert list(rows[0]) == ["step", "epoch", "loss", "synthetic-shapes", "synthetic-colors"]
    assert [(row["step"], row["epoch"]) for row in rows] == [("4", "1"), ("8", "2"), ("12", "3")]  # 4 steps/epoch
    for row in rows:
        assert 0 < float(row["loss"]) < 10
        assert all(0 <= float(row[name]) <= 1 for name in ("synthetic-shapes", "synthetic-colors"))
    assert (tmp_path / "reports/plots/train_epochs.csv").read_bytes() == (out / "epoch_curve.csv").read_bytes()

    client = MlflowClient(mlflow_store["uri"])
    mlflow_run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    for metric, column in (("epoch_loss", "loss"), ("zeroshot/synthetic-shapes", "synthetic-shapes"),
                           ("zeroshot/synthetic-colors", "synthetic-colors")):
        history = sorted(client.get_metric_history(mlflow_run.info.run_id, metric), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(int(r["step"]), float(r[column])) for r in rows], metric


def test_an_unknown_zero_shot_set_is_refused_by_name(tmp_path: Path) -> None:
    from clip.train import stage

    make_shards(tmp_path / "shards", n=32, per_shard=32)
    cfg = load_config(None, tiny_overrides(str(tmp_path / "shards"), str(tmp_path / "out"),
                                           **{"train.zeroshot_sets": "[synthetic-shape]"}))
    with pytest.raises(ValueError, match="train.zeroshot_sets: unknown set 'synthetic-shape'"):
        stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute)
