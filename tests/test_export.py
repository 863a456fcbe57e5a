"""The export stage on the tiny configs: real checkpoints in the train format, real ONNX, real onnxruntime.

Checkpoints are built with clip.model.create_model (random weights, no training) and written with
clip.formats.checkpoint, exactly as the train stage writes final.pt.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from clip import storage
from clip.config import ComputeConfig, ExportConfig, StorageConfig
from clip.export import ParityError, stage
from clip.export.publish import EVALUATION_BEGIN, EVALUATION_END
from clip.formats.bundle import verify_bundle
from clip.formats.checkpoint import FINAL_NAME, TrainedRun, checkpoint_bytes
from clip.formats.errors import MissingInputError
from clip.model import CheckpointMismatchError, create_model
from clip.tokenizer import Tokenizer
from clip.transforms import describe_transforms

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [f"a photo of {n} {c} {s}" for n in ("one", "two", "a") for c in ("red", "green", "blue", "small")
            for s in ("circle", "square", "dog", "cat", "car")]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CAPTIONS, vocab_size=600)


def write_checkpoint(path: Path, name: str, tokenizer: Tokenizer, seed: int = 0, **extra: object) -> Path:
    torch.manual_seed(seed)
    model = create_model(name, vocab_size=tokenizer.vocab_size)
    checkpoint = {"model": model.state_dict(), "model_config": model.config.to_dict(),
                  "tokenizer": tokenizer.to_json(), "data_version": "d" * 64, "mlflow_run_id": "run123", "step": 5,
                  **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(checkpoint_bytes(checkpoint))
    return path


def export(checkpoint: Path | str | None, output: Path | str, **kwargs: object) -> stage.ExportResult:
    cfg = ExportConfig(checkpoint=None if checkpoint is None else str(checkpoint), output_dir=str(output),
                       **kwargs)  # type: ignore[arg-type]
    return stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig())


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_tiny_configs_export_pass_parity_and_verify(tmp_path: Path, tokenizer: Tokenizer, name: str) -> None:
    ckpt = write_checkpoint(tmp_path / "run" / FINAL_NAME, name, tokenizer)
    result = export(ckpt, tmp_path / "bundle")
    manifest = verify_bundle(str(tmp_path / "bundle"))
    bundle = Path(result.outputs["files"])  # the version folder the top manifest names
    info = manifest.info
    model = create_model(name, vocab_size=tokenizer.vocab_size)
    assert info["model"] == name and info["embed_dim"] == model.config.embed_dim
    assert info["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert info["data_version"] == "d" * 64 and info["train_run_id"] == "run123"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    parity = info["parity"]
    for tower in ("image", "image_features", "text"):
        assert parity[f"{tower}_min_cosine"] >= 0.9999 and parity[f"{tower}_max_abs_diff"] <= 1e-4
        assert result.metrics[f"{tower}_min_cosine"] == parity[f"{tower}_min_cosine"]
    assert parity["zeroshot_disagreements"] == 0
    assert (bundle / "tokenizer.json").read_text() == tokenizer.to_json()
    assert json.loads((bundle / "preprocess.json").read_text()) == describe_transforms(model.image_size)
    card = (bundle / "model_card.md").read_text()
    assert info["checkpoint_sha256"] in card and "run123" in card and EVALUATION_BEGIN in card
    assert card.index(EVALUATION_BEGIN) < card.index(EVALUATION_END)
    for onnx_file in ("image_encoder.onnx", "text_encoder.onnx"):
        proto = onnx.load(str(bundle / onnx_file))
        onnx.checker.check_model(proto)
        assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 18
    assert not list(bundle.glob("*.data"))  # one self-contained file per tower


def test_dynamic_batch_and_text_padding_match_the_checkpoint(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """Batch sizes never traced (1, 3, 7) and captions of very different lengths, against eager PyTorch."""
    ckpt = write_checkpoint(tmp_path / FINAL_NAME, "tiny-vit", tokenizer, seed=3)
    files = Path(export(ckpt, tmp_path / "bundle").outputs["files"])
    model = stage.load_for_export(str(ckpt), None).model
    image = ort.InferenceSession(str(files / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(files / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in image.get_outputs()] == ["embedding", "features"]
    assert [i.name for i in text.get_inputs()] == ["text"] and text.get_inputs()[0].type == "tensor(int64)"
    captions = ["dog", " ".join(CAPTIONS[:6]), "a photo of two red cats", "car", "a", "one small blue square", "cat"]
    for batch in (1, 3, 7):
        images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        embedding, features = image.run(None, {"image": images.numpy()})
        tokens = tokenizer(captions[:batch]).long()
        (text_embedding,) = text.run(None, {"text": tokens.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(embedding, model.encode_image(images).numpy(), atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(text_embedding, model.encode_text(tokens).numpy(), atol=2e-5, rtol=1e-4)
        assert embedding.shape == (batch, 128) and features.shape == (batch, 128)
        np.testing.assert_allclose(features @ model.visual.proj.detach().numpy(), embedding, atol=2e-5, rtol=1e-4)


def perturb_one_weight(name: str, data: bytes) -> bytes:
    """Add seeded noise (std 0.02) to the image encoder's largest weight tensor (a test hook of export_bundle).

    Noise, not a constant shift: a constant added to a weight that follows a LayerNorm cancels out."""
    if name != "image_encoder.onnx":
        return data
    proto = onnx.load_from_string(data)
    biggest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(biggest).copy()
    values += np.random.default_rng(0).normal(0, 0.02, values.shape).astype(values.dtype)
    biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
    return proto.SerializeToString()


def test_planted_parity_failure_publishes_nothing_and_keeps_the_old_bundle(tmp_path: Path,
                                                                         tokenizer: Tokenizer) -> None:
    ckpt = write_checkpoint(tmp_path / FINAL_NAME, "tiny-vit", tokenizer)
    cfg = ExportConfig(checkpoint=str(ckpt), output_dir=str(tmp_path / "fresh"))
    with pytest.raises(ParityError, match=r"parity gate failed: image .* \(no bundle written\)"):
        stage.export_bundle(cfg, StorageConfig(), tamper=perturb_one_weight)
    assert not (tmp_path / "fresh").exists()
    # An existing bundle at the location survives a failing export untouched.
    export(ckpt, tmp_path / "bundle")
    before = {p: p.read_bytes() for p in (tmp_path / "bundle").rglob("*") if p.is_file()}
    newer = write_checkpoint(tmp_path / "newer.pt", "tiny-vit", tokenizer, seed=9)
    cfg = ExportConfig(checkpoint=str(newer), output_dir=str(tmp_path / "bundle"))
    with pytest.raises(ParityError):
        stage.export_bundle(cfg, StorageConfig(), tamper=perturb_one_weight)
    assert {p: p.read_bytes() for p in (tmp_path / "bundle").rglob("*") if p.is_file()} == before
    verify_bundle(str(tmp_path / "bundle"))


def test_stricter_threshold_fails_the_gate(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """The thresholds are live: an impossible max abs diff (below float32 round-off) fails the gate."""
    ckpt = write_checkpoint(tmp_path / FINAL_NAME, "tiny-vit", tokenizer)
    with pytest.raises(ParityError, match="max abs diff"):
        export(ckpt, tmp_path / "bundle", parity_max_abs_diff=1e-12)
    assert not (tmp_path / "bundle").exists()


def test_missing_checkpoint_errors_name_the_thing(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match=f"{tmp_path}/nope.pt does not exist"):
        export(tmp_path / "nope.pt", tmp_path / "bundle")
    (tmp_path / "run").mkdir()
    with pytest.raises(MissingInputError, match=f"no checkpoint in {tmp_path}/run \\(export.checkpoint\\)"):
        export(tmp_path / "run", tmp_path / "bundle")
    unfinished = TrainedRun(str(tmp_path / "runs" / "tiny-vit-aaaaaaaaaaaa"), "a" * 64)
    with pytest.raises(MissingInputError, match="no finished training run for data version aaaaaaaaaaaa: no final.pt in "
                                                 f"{unfinished.folder} "):
        stage.run(ExportConfig(output_dir=str(tmp_path / "bundle")), storage=StorageConfig(),
                  compute=ComputeConfig(), train_run=unfinished)
    assert not (tmp_path / "bundle").exists()


def test_a_run_folder_means_its_final_checkpoint(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """(Which run export.checkpoint: null means, the run of the data version latest.json names: test_lineage.py.)"""
    run = tmp_path / "runs" / "tiny-vit-aaaa"
    final = write_checkpoint(run / FINAL_NAME, "tiny-vit", tokenizer, seed=1)
    assert stage.checkpoint_to_export(ExportConfig(checkpoint=str(run)), None) == str(final)


def test_config_and_weights_that_disagree_are_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    ckpt = write_checkpoint(tmp_path / FINAL_NAME, "tiny-vit", tokenizer)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["model_config"] = create_model("tiny-rn", vocab_size=tokenizer.vocab_size).config.to_dict()
    ckpt.write_bytes(checkpoint_bytes(checkpoint))
    with pytest.raises(CheckpointMismatchError,
                       match=f"{ckpt}: weights disagree with its model_config \\(tiny-rn\\)") as err:
        export(ckpt, tmp_path / "bundle")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bundle").exists()


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.export", "--set", f"export.checkpoint={tmp_path}/missing.pt",
         "--set", f"export.output_dir={tmp_path}/bundle"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
        check=False)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: export:")]
    assert len(errors) == 1 and f"{tmp_path}/missing.pt does not exist" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bundle_on_s3(tmp_path: Path, tokenizer: Tokenizer, s3_bucket: str) -> None:
    ckpt = write_checkpoint(tmp_path / FINAL_NAME, "tiny-vit", tokenizer)
    prefix = f"s3://{s3_bucket}/models/bundle"
    result = export(ckpt, prefix)
    assert result.outputs["manifest"] == f"{prefix}/manifest.json"
    manifest = verify_bundle(prefix, StorageConfig())
    assert manifest.info["parity"]["zeroshot_disagreements"] == 0
    image = storage.read_bytes(f"{result.outputs['files']}/image_encoder.onnx")
    session = ort.InferenceSession(image, providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((2, 3, 64, 64), np.float32)})[0].shape == (2, 128)


def test_int8_encoder_is_written_beside_the_float_one(tmp_path: Path, tokenizer: Tokenizer) -> None:
    from PIL import Image

    from clip.formats.bundle import IMAGE_ENCODER_NAME, INT8_IMAGE_ENCODER_NAME
    from clip.runtime import Bundle

    ckpt = write_checkpoint(tmp_path / "run", "tiny-vit", tokenizer)
    plain = export(ckpt, tmp_path / "plain")
    result = export(ckpt, tmp_path / "bundle", int8=True)
    manifest = verify_bundle(str(tmp_path / "bundle"))
    assert INT8_IMAGE_ENCODER_NAME in manifest.files
    assert INT8_IMAGE_ENCODER_NAME not in verify_bundle(str(tmp_path / "plain")).files
    # the float encoder is the very file an export without int8 writes; the int8 one is smaller and close to it
    float_bytes = Path(result.outputs["files"], IMAGE_ENCODER_NAME).read_bytes()
    assert float_bytes == Path(plain.outputs["files"], IMAGE_ENCODER_NAME).read_bytes()
    assert manifest.files[INT8_IMAGE_ENCODER_NAME]["bytes"] < len(float_bytes)
    assert manifest.info["int8"] and any(key.startswith("int8_") for key in result.metrics)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    quantized = Bundle.load(str(tmp_path / "bundle"), int8=True).encode_images(images, normalize=True)
    reference = Bundle.load(str(tmp_path / "bundle")).encode_images(images, normalize=True)
    assert (quantized * reference).sum(axis=1).min() > 0.95
