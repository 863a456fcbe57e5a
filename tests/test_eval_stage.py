"""The evaluation stage end to end on a tiny real model: a checkpoint written as final.pt (clip.formats.checkpoint),
its export bundle, the built-in synthetic sets, absent datasets listed as skipped, determinism, checkpoint vs
bundle parity, and the `clip-pipeline evaluate` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip.config import ComputeConfig, EvaluateConfig, StorageConfig
from clip.eval import stage
from clip.eval.encoders import BundleEncoder, CheckpointEncoder, image_features
from clip.eval.features import extract
from clip.eval.synthetic_sets import synthetic_set
from clip.eval.zeroshot import zeroshot_scores
from clip.formats.checkpoint import FINAL_NAME, checkpoint_bytes
from clip.formats.results import RESULTS_CSV, RESULTS_JSON, RESULTS_MARKDOWN, ResultsTable
from clip.model import create_model
from clip.progress import RecordingProgress
from clip.tokenizer import Tokenizer
from tests.support.bundles import CAPTIONS, build_bundle

REPO = Path(__file__).resolve().parents[1]


def save_checkpoint(model, tokenizer: Tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINAL_NAME
    path.write_bytes(checkpoint_bytes({"model": model.state_dict(), "model_config": model.config.to_dict(),
                                       "tokenizer": tokenizer.to_json(), "train_config": {}}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(CAPTIONS * 4, vocab_size=700, min_frequency=1)
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size).eval()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def bundle_and_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("export")
    model, tokenizer = build_bundle(folder / "bundle")
    return folder / "bundle", save_checkpoint(model, tokenizer, folder / "run")


def section(tmp_path: Path, checkpoint_path: Path | None, **overrides) -> EvaluateConfig:
    values = {"checkpoint": None if checkpoint_path is None else str(checkpoint_path), "output_dir": str(tmp_path / "eval"), "data_root": str(tmp_path / "data"),
              "datasets": ["synthetic-shapes"], "synthetic_samples": 24, "batch_size": 8, "workers": 2,
              "cache_dir": None, "plots": False, **overrides}
    return EvaluateConfig(**values)


def run(cfg: EvaluateConfig, progress=None) -> stage.EvalResult:
    return stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig(device="cpu"), progress=progress)


def test_stage_end_to_end_lists_absent_datasets_as_skipped(tmp_path: Path, checkpoint: Path) -> None:
    cfg = section(tmp_path, checkpoint, datasets=["synthetic-colors", "cifar10", "flickr30k"], plots=True,
                  cache_dir=str(tmp_path / "cache"))
    progress = RecordingProgress()
    result = run(cfg, progress)
    rows = {(r.dataset, r.task): r for r in result.table.rows}
    assert set(rows) == {("synthetic-colors", "zeroshot"), ("synthetic-colors", "linear_probe"),
                         ("cifar10", "zeroshot"), ("cifar10", "linear_probe"), ("flickr30k", "retrieval")}
    for key in [("cifar10", "zeroshot"), ("cifar10", "linear_probe")]:
        assert rows[key].status == "skipped" and rows[key].value is None
        assert str(tmp_path / "data" / "cifar-10-batches-py") in rows[key].note
    assert rows[("flickr30k", "retrieval")].status == "skipped"
    assert str(tmp_path / "data" / "flickr30k") in rows[("flickr30k", "retrieval")].note
    zs = rows[("synthetic-colors", "zeroshot")]
    assert zs.status == "ok" and zs.samples == 24 and 0 <= zs.value <= 1 and "top5=" in zs.details
    assert result.metrics["synthetic-colors/zeroshot"] == zs.value
    assert result.metrics["datasets_skipped"] == 2 and result.metrics["datasets_evaluated"] == 1
    assert result.metrics["mean"] == pytest.approx(np.mean([zs.value, rows[("synthetic-colors", "linear_probe")].value]))
    out = tmp_path / "eval"
    table = ResultsTable.from_json_bytes((out / RESULTS_JSON).read_bytes())
    assert table == result.table
    assert "cifar10" in (out / RESULTS_CSV).read_text() and "skipped" in (out / RESULTS_MARKDOWN).read_text()
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "confusion-synthetic-colors.png").read_bytes()[:4] == b"\x89PNG"
    assert progress.last["evaluate: datasets"][:2] == (3, 3)
    assert progress.last["evaluate: synthetic-colors test"][:2] == (24, 24)


def test_two_evaluations_give_identical_numbers(tmp_path: Path, checkpoint: Path) -> None:
    # (the probe's determinism is tested in test_eval_engine.py; here the images, encoder and zero-shot path)
    cfg = section(tmp_path, checkpoint, datasets=["synthetic-shapes", "synthetic-heldout"], workers=3,
                  linear_probe=False)
    first, second = run(cfg), run(cfg)
    assert first.table == second.table
    assert first.metrics["synthetic-shapes/zeroshot/top5"] == second.metrics["synthetic-shapes/zeroshot/top5"]
    assert [(r.dataset, r.task, r.status) for r in first.table.rows] == [
        ("synthetic-shapes", "zeroshot", "ok"), ("synthetic-heldout", "zeroshot", "ok")]


def test_unknown_dataset_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="not-a-dataset"):
        run(section(tmp_path, checkpoint, datasets=["not-a-dataset"]))


def test_missing_bundle_names_it(tmp_path: Path) -> None:
    from clip.formats.errors import MissingInputError

    cfg = EvaluateConfig(bundle=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "eval"))
    with pytest.raises(MissingInputError, match="nowhere"):
        run(cfg)


def test_checkpoint_and_bundle_give_the_same_predictions(bundle_and_checkpoint: tuple[Path, Path]) -> None:
    bundle_dir, checkpoint_path = bundle_and_checkpoint
    onnx_encoder = BundleEncoder.load(str(bundle_dir))
    torch_encoder = CheckpointEncoder.load(str(checkpoint_path))
    assert onnx_encoder.logit_scale == pytest.approx(torch_encoder.logit_scale)
    evalset = synthetic_set("synthetic-shapes", "test", n=30, image_size=torch_encoder.image_size)
    results = []
    for encoder in (onnx_encoder, torch_encoder):
        extracted = extract(encoder, evalset, batch_size=7, workers=2)
        results.append((extracted, zeroshot_scores(encoder, extracted.embeddings, extracted.labels, evalset.classes,
                                                   evalset.templates)))
    (onnx_x, onnx_z), (torch_x, torch_z) = results
    np.testing.assert_allclose(onnx_x.embeddings, torch_x.embeddings, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(onnx_x.features, torch_x.features, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(onnx_z.logits, torch_z.logits, rtol=1e-3, atol=1e-3)
    assert onnx_z.predictions.tolist() == torch_z.predictions.tolist()
    assert onnx_z.value == torch_z.value
    # the features are those before the projection: projecting them gives the embedding
    model = torch_encoder.model
    projected = image_features(torch_encoder, [evalset.image(0)]) @ model.visual.proj.detach().numpy()
    np.testing.assert_allclose(projected, torch_x.embeddings[:1], rtol=1e-4, atol=1e-5)


def test_resnet_checkpoint_features_are_before_c_proj(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tokenizer = Tokenizer.train(CAPTIONS * 4, vocab_size=700, min_frequency=1)
    model = create_model("tiny-rn", vocab_size=tokenizer.vocab_size).eval()
    encoder = CheckpointEncoder.load(str(save_checkpoint(model, tokenizer, tmp_path / "rn")))
    evalset = synthetic_set("synthetic-colors", "test", n=4, image_size=encoder.image_size)
    extracted = extract(encoder, evalset, batch_size=4)
    c_proj = encoder.model.visual.attnpool.c_proj
    with torch.no_grad():
        again = c_proj(torch.from_numpy(extracted.features)).numpy()
    np.testing.assert_allclose(again, extracted.embeddings, rtol=1e-4, atol=1e-5)
    assert extracted.features.shape[1] == c_proj.in_features


def test_cli_evaluate_with_datasets_and_root(tmp_path: Path, checkpoint: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"evaluate": {"output_dir": str(tmp_path / "eval"), "synthetic_samples": 12,
                                               "cache_dir": None, "linear_probe": False, "plots": False},
                                  "tracking": {"enabled": False}}))
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "evaluate", "--params", str(params), "--datasets",
         "cifar10,synthetic-shapes", "--root", str(tmp_path / "nothing"), "--checkpoint", str(checkpoint)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    table = ResultsTable.from_json_bytes((tmp_path / "eval" / RESULTS_JSON).read_bytes())
    assert [(r.dataset, r.task, r.status) for r in table.rows] == [
        ("cifar10", "zeroshot", "skipped"), ("synthetic-shapes", "zeroshot", "ok")]
    assert "synthetic-shapes" in done.stderr and "mean over evaluated rows" in done.stderr


def test_stage_evaluates_the_bundle_by_default(tmp_path: Path, bundle_and_checkpoint: tuple[Path, Path]) -> None:
    bundle_dir, checkpoint_path = bundle_and_checkpoint
    by_bundle = run(section(tmp_path, None, bundle=str(bundle_dir), linear_probe=False,
                            synthetic_samples=12))
    by_checkpoint = run(section(tmp_path, checkpoint_path, linear_probe=False, synthetic_samples=12))
    assert by_bundle.metrics["model"].startswith("bundle:") and by_checkpoint.metrics["model"].startswith("checkpoint:")
    assert by_bundle.metrics["synthetic-shapes/zeroshot"] == by_checkpoint.metrics["synthetic-shapes/zeroshot"]


def test_evaluation_is_logged_to_mlflow(tmp_path: Path, checkpoint: Path, mlflow_store: dict[str, str]) -> None:
    """Per-dataset figures as metrics (the compare view lines runs up), the table through log_table, the plots."""
    from mlflow.tracking import MlflowClient

    from clip.config import TrackingConfig

    tracking = TrackingConfig(uri=mlflow_store["uri"], artifact_location=mlflow_store["artifact_location"],
                              experiment="eval-test")
    result = stage.run(section(tmp_path, checkpoint, datasets=["synthetic-colors"], linear_probe=False,
                               plots=True), storage=StorageConfig(), compute=ComputeConfig(device="cpu"),
                       tracking=tracking)
    client = MlflowClient(tracking_uri=mlflow_store["uri"])
    [run_] = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert run_.data.metrics["synthetic-colors/zeroshot"] == pytest.approx(result.metrics["synthetic-colors/zeroshot"])
    assert run_.data.tags["model_fingerprint"] == result.metrics["model_fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id, "eval")}
    assert {"eval/results.json", "eval/scores.png", "eval/results.md"} <= artifacts
