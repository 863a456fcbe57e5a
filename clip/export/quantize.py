"""Optional int8 image encoder: onnxruntime dynamic quantisation, measured against the float encoder.

    quantized = quantize_image_encoder(image_onnx_bytes, sample_images)   # sample: float32 [N, 3, S, S]
    contents[INT8_IMAGE_ENCODER_NAME] = quantized.model                   # beside, never instead of, the float one
    metrics.update(quantized.report)                                      # size, speed, embedding difference

What was chosen and why:
- **Dynamic quantisation** (`onnxruntime.quantization.quantize_dynamic`, int8 weights, activations quantised
  per batch at run time): no calibration data set is needed, which the export stage does not have; the
  matrix multiplications that dominate a ViT (and the convolutions of a ResNet) become integer ops.
- **Reported, not gated.** The int8 model changes the numbers (typically cosine 0.99+ to the float
  embeddings, not the float model's 0.9999 parity), so it is never the bundle's `image_encoder.onnx`: it is
  an extra file, and `report` says how far it is from the float one (cosine min/mean of the embeddings, max
  abs difference of the normalised embeddings, top-1 agreement of nearest neighbours), how much smaller and
  how much faster it is, measured here on the CPU with the same onnxruntime session options.
- The outputs keep the contract's names ("embedding", "features"), so `clip.runtime.Bundle.load(int8=True)`
  runs it like the float one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from clip.formats.errors import FormatError


@dataclass(frozen=True)
class QuantizedEncoder:
    model: bytes  # the int8 ONNX model, one file
    report: dict[str, Any] = field(default_factory=dict)  # int8_<figure>: sizes, speeds, embedding differences


@contextmanager
def _quiet_root_warnings() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _session(model: bytes, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _images_per_second(session: ort.InferenceSession, images: np.ndarray, repeats: int) -> float:
    session.run(["embedding"], {"image": images})  # warm-up (allocations, kernel selection)
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(["embedding"], {"image": images})
    return repeats * len(images) / max(time.perf_counter() - start, 1e-9)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def quantize_image_encoder(float_model: bytes, sample_images: np.ndarray | None = None, *, repeats: int = 3,
                           threads: int | None = None, seed: int = 0) -> QuantizedEncoder:
    """Quantise `float_model` (the bundle's image_encoder.onnx bytes) to int8 weights and measure it.

    `sample_images`: preprocessed float32 [N, 3, S, S] images to compare and time on (real images give the
    meaningful figures); None uses 8 standard-normal images, which only exercise the graph.
    """
    float_session = _session(float_model, threads)
    image_input = float_session.get_inputs()[0]
    if image_input.name != "image" or "embedding" not in [o.name for o in float_session.get_outputs()]:
        raise FormatError("image encoder to quantise must have input 'image' and output 'embedding' "
                          f"(input {image_input.name!r})")
    if sample_images is None:
        size = image_input.shape[-1]
        if not isinstance(size, int):
            raise ValueError(f"image encoder input has no static size ({image_input.shape}); pass sample_images")
        sample_images = np.random.default_rng(seed).standard_normal((8, 3, size, size)).astype(np.float32)
    sample_images = np.ascontiguousarray(sample_images, dtype=np.float32)
    if sample_images.ndim != 4 or len(sample_images) == 0:
        raise ValueError(f"sample_images must be a non-empty [N, 3, S, S] batch, got shape {sample_images.shape}")

    with tempfile.TemporaryDirectory(prefix="clip-int8-") as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(float_model)
        # onnxruntime logs a generic "consider pre-processing" warning on the root logger for every model. That
        # optional pre-pass (symbolic shape inference + graph optimisation) is not run: the exported graphs
        # quantise without it, and the report below measures the result either way.
        with _quiet_root_warnings():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=False)
        int8_model = target.read_bytes()
    int8_session = _session(int8_model, threads)

    reference = float_session.run(["embedding"], {"image": sample_images})[0]
    quantized = int8_session.run(["embedding"], {"image": sample_images})[0]
    ref_n, q_n = _normalise(reference), _normalise(quantized)
    cosine = (ref_n * q_n).sum(axis=-1)
    # Retrieval agreement: does each sample's nearest other sample stay the same?
    same_neighbour = 1.0
    if len(sample_images) > 2:
        ref_sim, q_sim = ref_n @ ref_n.T, q_n @ q_n.T
        np.fill_diagonal(ref_sim, -np.inf)
        np.fill_diagonal(q_sim, -np.inf)
        same_neighbour = float((ref_sim.argmax(axis=1) == q_sim.argmax(axis=1)).mean())
    float_speed = _images_per_second(float_session, sample_images, repeats)
    int8_speed = _images_per_second(int8_session, sample_images, repeats)
    report = {
        "int8_float_bytes": len(float_model),
        "int8_bytes": len(int8_model),
        "int8_size_ratio": len(int8_model) / len(float_model),
        "int8_cosine_min": float(cosine.min()),
        "int8_cosine_mean": float(cosine.mean()),
        "int8_max_abs_diff_normalised": float(np.abs(ref_n - q_n).max()),
        "int8_nearest_neighbour_agreement": same_neighbour,
        "int8_float_images_per_s": float_speed,
        "int8_images_per_s": int8_speed,
        "int8_speedup": int8_speed / float_speed,
        "int8_sample_images": len(sample_images),
    }
    return QuantizedEncoder(model=int8_model, report=report)
