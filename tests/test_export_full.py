"""Full-size export (heavy): ViT-B-32 and RN50 through the export stage, parity gate included.

Random weights in the train stage's checkpoint format; the point is that the real architectures (12-layer
ViT, modified ResNet-50 with attention pooling) export with a dynamic batch and match the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from clip.formats.bundle import verify_bundle
from clip.formats.checkpoint import FINAL_NAME
from clip.tokenizer import Tokenizer
from tests.test_export import CAPTIONS, export, write_checkpoint

pytestmark = pytest.mark.heavy


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_full_size_export_passes_parity(tmp_path: Path, name: str) -> None:
    tokenizer = Tokenizer.train(CAPTIONS, vocab_size=600)
    ckpt = write_checkpoint(tmp_path / FINAL_NAME, name, tokenizer)
    result = export(ckpt, tmp_path / "bundle")
    info = verify_bundle(str(tmp_path / "bundle")).info
    assert info["model"] == name and info["image_size"] == 224
    for tower in ("image", "image_features", "text"):
        assert result.metrics[f"{tower}_min_cosine"] >= 0.9999
        assert result.metrics[f"{tower}_max_abs_diff"] <= 1e-4
    assert result.metrics["zeroshot_disagreements"] == 0
    session = ort.InferenceSession(str(Path(result.outputs["files"]) / "image_encoder.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 224, 224]
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # the batch axis stayed dynamic
