"""The parity gate: the exported ONNX models must compute what the checkpoint computes.

    report = check_parity(model, tokenizer, image_onnx, text_onnx, thresholds)   # ParityReport
    report.raise_if_failed()    # ParityError naming the tower and the figure that failed

Both ONNX models run in onnxruntime (CPU provider, the reference runtime of the bundle) and the PyTorch model in
float32 eager mode (with its padding trimming on, as training and evaluation run it) on fresh seeded random
images and on real captions (a fixed list of English sentences, tokenized with the checkpoint's tokenizer), at
batch sizes 1 and 7, so that the dynamic batch axis is exercised too. Per tower it measures, over every pair:
- `min_cosine`: the smallest cosine similarity between an ONNX embedding and the PyTorch one;
- `max_abs_diff`: the largest absolute difference of the L2-normalised embeddings;
and on the image side also the `features` output (against the same eager computation). Zero-shot: the batch-7
images are classified against the batch-7 captions as labels, by both; every top-1 prediction must agree.
Thresholds (ExportConfig): cosine >= 0.9999, max abs diff <= 1e-4, zero-shot disagreements 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from clip.export.onnx_export import (
    EMBEDDING_OUTPUT,
    FEATURES_OUTPUT,
    IMAGE_INPUT,
    TEXT_INPUT,
    ImageEncoder,
)
from clip.model import CLIP
from clip.tokenizer import Tokenizer

BATCH_SIZES = (1, 7)
PARITY_CAPTIONS = (
    "a photo of a dog.",
    "a red circle on a white background",
    "two people walking along the beach at sunset, with the waves behind them",
    "a close-up photo of a cat sleeping on a blue sofa.",
    "an aerial view of a city at night",
    "a green triangle",
    "a bowl of fruit: apples, oranges and a banana on a wooden kitchen table near the window",
    "the number 7",
)


class ParityError(ValueError):
    """The exported models differ from the checkpoint beyond the configured tolerance."""


@dataclass(frozen=True)
class ParityThresholds:
    min_cosine: float = 0.9999
    max_abs_diff: float = 1e-4


@dataclass
class ParityReport:
    figures: dict[str, float] = field(default_factory=dict)  # e.g. image_min_cosine, text_max_abs_diff
    failures: list[str] = field(default_factory=list)

    def raise_if_failed(self) -> None:
        if self.failures:
            raise ParityError("parity gate failed: " + "; ".join(self.failures) + " (no bundle written)")


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def compare(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(min cosine similarity of row pairs, max abs difference of the normalised rows)."""
    a, b = _normalise(ours.astype(np.float64)), _normalise(reference.astype(np.float64))
    return float((a * b).sum(-1).min()), float(np.abs(a - b).max())


def parity_images(model: CLIP, batch: int, seed: int) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check_parity(model: CLIP, tokenizer: Tokenizer, image_onnx: bytes, text_onnx: bytes,
                 thresholds: ParityThresholds, seed: int = 0) -> ParityReport:
    """Measure the ONNX models against `model` (float32, eager) and judge them; never raises on a failure."""
    model = model.float().eval()
    image_session, text_session = _session(image_onnx), _session(text_onnx)
    eager_image = ImageEncoder(model).eval()
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"image": [], "image_features": [], "text": []}
    zeroshot: dict[str, np.ndarray] = {}
    captions = list(PARITY_CAPTIONS)
    with torch.no_grad():
        for offset, batch in enumerate(BATCH_SIZES):
            images = parity_images(model, batch, seed + 1 + offset)
            onnx_embedding, onnx_features = image_session.run(
                [EMBEDDING_OUTPUT, FEATURES_OUTPUT], {IMAGE_INPUT: images.numpy()})
            torch_embedding = model.encode_image(images).numpy()
            pairs["image"].append((onnx_embedding, torch_embedding))
            pairs["image_features"].append((onnx_features, eager_image(images)[1].numpy()))
            tokens = tokenizer(captions[offset: offset + batch] if batch > 1 else captions[:1])
            tokens = tokens.to(torch.int64)
            (onnx_text,) = text_session.run([EMBEDDING_OUTPUT], {TEXT_INPUT: tokens.numpy()})
            torch_text = model.encode_text(tokens).numpy()
            pairs["text"].append((onnx_text, torch_text))
            if batch == max(BATCH_SIZES):
                zeroshot["onnx"] = (_normalise(onnx_embedding) @ _normalise(onnx_text).T).argmax(-1)
                zeroshot["torch"] = (_normalise(torch_embedding) @ _normalise(torch_text).T).argmax(-1)
    report = ParityReport()
    for tower, items in pairs.items():
        cosines, diffs = zip(*(compare(ours, ref) for ours, ref in items), strict=True)
        cosine, diff = min(cosines), max(diffs)
        report.figures[f"{tower}_min_cosine"] = cosine
        report.figures[f"{tower}_max_abs_diff"] = diff
        if not cosine >= thresholds.min_cosine:  # `not >=`: a NaN fails too
            report.failures.append(f"{tower} min cosine {cosine:.6f} < {thresholds.min_cosine}")
        if not diff <= thresholds.max_abs_diff:
            report.failures.append(f"{tower} max abs diff {diff:.2e} > {thresholds.max_abs_diff}")
    disagree = int((zeroshot["onnx"] != zeroshot["torch"]).sum())
    report.figures["zeroshot_disagreements"] = disagree
    report.figures["zeroshot_samples"] = int(zeroshot["onnx"].shape[0])
    if disagree:
        report.failures.append(f"zero-shot top-1 differs on {disagree} of {zeroshot['onnx'].shape[0]} images")
    return report


def parity_info(report: ParityReport, thresholds: ParityThresholds) -> dict[str, Any]:
    """The figures and the thresholds they passed, for the manifest info and the model card."""
    return {**report.figures, "threshold_min_cosine": thresholds.min_cosine,
            "threshold_max_abs_diff": thresholds.max_abs_diff, "batch_sizes": list(BATCH_SIZES)}
