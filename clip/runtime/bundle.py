"""A loaded export bundle: embed images and texts, classify zero-shot, rank images, with onnxruntime only.

    bundle = Bundle.load("models/bundle")                   # local folder or s3:// prefix
    probs = bundle.classify(images, ["cat", "dog"])         # float32 [N, 2], rows sum to 1
    order = bundle.rank(images, "a red circle")              # [(image index, cosine), ...], best first
    emb = bundle.encode_images(images); txt = bundle.encode_texts(["a dog"])

What a caller can rely on:
- **Verified before use.** `load` runs `clip.formats.bundle.verify_bundle` (every listed file against its
  sha256: a missing or altered file is refused, naming it) and checks the bytes it then reads against the same
  manifest, so a file swapped between the two reads is refused too. The ONNX models must have the contract's
  names (input "image" / "text", output "embedding"; "features" for `image_features`).
- **The checkpoint's numbers.** Embeddings are what the bundle's encoders output: projected and unnormalised
  (as `CLIP.encode_image` / `encode_text`) unless `normalize=True`. Images go through `preprocess.json`
  (clip.runtime.preprocess); texts through the bundle's own `tokenizer.json` (the ids clip.tokenizer gives).
- **Zero-shot as CLIP does it.** Each class embedding is the mean of its L2-normalised prompt embeddings
  (one per template), normalised again; probabilities are `softmax(logit_scale * cos)` with the bundle's
  `logit_scale` (the exp'd, clamped multiplier of manifest `info`). Class embeddings are cached per
  (labels, templates).
- **Batched.** Every call runs the encoders in batches of `batch_size` (the ONNX batch axis is dynamic).
- No torch anywhere on this path: onnxruntime, numpy, pillow, tokenizers.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import PIL.Image

from clip import storage
from clip.config import StorageConfig
from clip.formats.bundle import (
    BUNDLE_MANIFEST_NAME,
    IMAGE_ENCODER_NAME,
    INT8_IMAGE_ENCODER_NAME,
    PREPROCESS_NAME,
    TEXT_ENCODER_NAME,
    TOKENIZER_NAME,
    BundleManifest,
    bundle_files_location,
    verify_bundle,
)
from clip.formats.errors import FormatError
from clip.runtime.preprocess import Preprocessor
from clip.tokenizer import Tokenizer

# The optional dynamically quantised image encoder (bundle contract); belongs in clip.formats.bundle.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
ImageInput = Sequence[PIL.Image.Image] | np.ndarray  # PIL images, or a preprocessed float32 [N, 3, S, S] batch


def load_image(source: str | Path | bytes, name: str | None = None) -> PIL.Image.Image:
    """Decode an image file (path or bytes) fully, as RGB; an undecodable one raises FormatError naming it."""
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        image = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()  # decode now: a truncated file fails here, not later in a batch
        return image.convert("RGB")
    except FileNotFoundError:
        raise FormatError(f"image {label}: no such file") from None
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise FormatError(f"image {label} cannot be decoded: {exc}") from None


def top_k(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row of `probabilities` [N, C] (columns in `labels` order) its `k` most probable labels, best first, as
    (label, probability); ties keep the labels' order. `k` larger than C gives all C."""
    k = max(0, min(k, len(labels)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(labels[j], float(row[j])) for j in picks] for row, picks in zip(probabilities, order, strict=True)]


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _session(model: bytes, name: str, providers: Sequence[str] | None, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise FormatError(f"bundle file {name} is not a loadable ONNX model: {exc}") from None


class Bundle:
    """An export bundle loaded into onnxruntime sessions. Build with `Bundle.load`."""

    def __init__(self, folder: str, manifest: BundleManifest, image_session: ort.InferenceSession,
                 text_session: ort.InferenceSession, tokenizer: Tokenizer, preprocessor: Preprocessor,
                 image_encoder_name: str = IMAGE_ENCODER_NAME) -> None:
        self.folder, self.manifest = folder, manifest
        self.image_session, self.text_session = image_session, text_session
        self.tokenizer, self.preprocessor = tokenizer, preprocessor
        self.image_encoder_name = image_encoder_name
        info = manifest.info
        manifest_uri = storage.join(folder, BUNDLE_MANIFEST_NAME)
        if not isinstance(info.get("logit_scale"), int | float):
            raise FormatError(f"{manifest_uri}: info.logit_scale is missing or not a number")
        self.logit_scale = float(info["logit_scale"])
        self.context_length = int(info.get("context_length") or tokenizer.context_length)
        self.image_size = preprocessor.size
        self._image_outputs = [o.name for o in image_session.get_outputs()]
        for session, name, expected_input in ((image_session, image_encoder_name, "image"),
                                              (text_session, TEXT_ENCODER_NAME, "text")):
            inputs = [i.name for i in session.get_inputs()]
            outputs = [o.name for o in session.get_outputs()]
            if inputs != [expected_input] or "embedding" not in outputs:
                raise FormatError(f"bundle {folder}: {name} has inputs {inputs} and outputs {outputs}; expected "
                                  f"input {expected_input!r} and output 'embedding'")
        self._class_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = {}

    # -- loading -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | Path, storage_cfg: StorageConfig | None = None, *, int8: bool = False,
             providers: Sequence[str] | None = None, threads: int | None = None) -> Bundle:
        """Verify the manifest, then load the encoders, tokenizer and preprocessing. `int8`: use the quantised
        image encoder (refused, naming it, when the bundle has none)."""
        folder = str(folder)
        manifest = verify_bundle(folder, storage_cfg)
        image_name = INT8_IMAGE_ENCODER_NAME if int8 else IMAGE_ENCODER_NAME
        if image_name not in manifest.files:
            raise FormatError(f"bundle {folder}: {image_name} is not in the bundle (export with export.int8: true)")

        location = bundle_files_location(folder, manifest)  # the version the verified manifest names

        def read(name: str) -> bytes:
            data = storage.read_bytes(storage.join(location, name), storage_cfg)
            if hashlib.sha256(data).hexdigest() != manifest.files[name]["sha256"]:
                raise FormatError(f"bundle {folder}: {name} was altered (sha256 differs from the bundle manifest)")
            return data

        try:
            tokenizer = Tokenizer.from_json(read(TOKENIZER_NAME).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            raise FormatError(f"bundle {folder}: {TOKENIZER_NAME} is not a tokenizer file ({exc})") from None
        try:
            preprocessor = Preprocessor.from_description(json.loads(read(PREPROCESS_NAME)))
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise FormatError(f"bundle {folder}: {PREPROCESS_NAME}: {exc}") from None
        image_session = _session(read(image_name), image_name, providers, threads)
        text_session = _session(read(TEXT_ENCODER_NAME), TEXT_ENCODER_NAME, providers, threads)
        return cls(folder, manifest, image_session, text_session, tokenizer, preprocessor, image_name)

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.info

    # -- images --------------------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[PIL.Image.Image] | PIL.Image.Image) -> np.ndarray:
        """PIL images -> float32 [N, 3, S, S], exactly as preprocess.json says."""
        return self.preprocessor(images)  # type: ignore[arg-type]

    def _image_batches(self, images: ImageInput, batch_size: int) -> list[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if isinstance(images, np.ndarray):
            expected = (3, self.image_size, self.image_size)
            if images.ndim != 4 or tuple(images.shape[1:]) != expected:
                raise ValueError(f"preprocessed images must be [N, {expected[0]}, {expected[1]}, {expected[2]}], "
                                 f"got {list(images.shape)}")
            pixels = images.astype(np.float32, copy=False)
            return [pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)]
        return [self.preprocess(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]

    def _run_images(self, images: ImageInput, output: str, batch_size: int) -> np.ndarray:
        if output not in self._image_outputs:
            raise FormatError(f"bundle {self.folder}: {self.image_encoder_name} has no {output!r} output "
                              f"(outputs: {self._image_outputs})")
        batches = self._image_batches(images, batch_size)
        if not batches:
            width = self.image_session.get_outputs()[self._image_outputs.index(output)].shape[-1]
            return np.zeros((0, width if isinstance(width, int) else 0), dtype=np.float32)
        return np.concatenate([self.image_session.run([output], {"image": batch})[0] for batch in batches])

    def encode_images(self, images: ImageInput, *, batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        """float32 [N, embed_dim]: the projected image embeddings (unit vectors with `normalize=True`)."""
        embeddings = self._run_images(images, "embedding", batch_size)
        return _l2_normalise(embeddings) if normalize else embeddings

    def image_features(self, images: ImageInput, *, batch_size: int = 32) -> np.ndarray:
        """float32 [N, width]: the pooled image features before the projection (for linear probes)."""
        return self._run_images(images, "features", batch_size)

    # -- texts ---------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int64 [N, context_length] token ids from the bundle's tokenizer."""
        return self.tokenizer.encode_batch(list(texts), self.context_length)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256, normalize: bool = False) -> np.ndarray:
        """float32 [N, embed_dim]: the projected text embeddings (unit vectors with `normalize=True`)."""
        if isinstance(texts, str):
            texts = [texts]
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        texts = list(texts)
        parts = [self.text_session.run(["embedding"], {"text": self.tokenize(texts[i:i + batch_size])})[0]
                 for i in range(0, len(texts), batch_size)]
        embed_dim = int(self.info.get("embed_dim") or 0)
        embeddings = np.concatenate(parts) if parts else np.zeros((0, embed_dim), dtype=np.float32)
        return _l2_normalise(embeddings) if normalize else embeddings

    # -- zero-shot and retrieval ---------------------------------------------------------------------------

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """float32 [C, embed_dim], unit rows: per label the re-normalised mean of its normalised prompts."""
        labels, templates = tuple(labels), tuple(templates)
        if not labels:
            raise ValueError("labels: at least one label is needed")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"templates must each contain '{{}}' (where the label goes), got {list(templates)}")
        key = (labels, templates)
        cached = self._class_cache.get(key)
        if cached is None:
            prompts = [template.format(label) for label in labels for template in templates]
            per_prompt = self.encode_texts(prompts, normalize=True).reshape(len(labels), len(templates), -1)
            cached = _l2_normalise(per_prompt.mean(axis=1)).astype(np.float32)
            self._class_cache[key] = cached
        return cached

    def classify(self, images: ImageInput, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 *, batch_size: int = 32) -> np.ndarray:
        """float32 [N, C]: zero-shot probabilities of each label (columns in `labels` order)."""
        classes = self.class_embeddings(labels, templates)
        image_embeddings = self.encode_images(images, batch_size=batch_size, normalize=True)
        return _softmax(self.logit_scale * image_embeddings @ classes.T).astype(np.float32)

    def rank(self, images: ImageInput, query: str, *, batch_size: int = 32) -> list[tuple[int, float]]:
        """Images ordered by cosine similarity to the text `query`, best first: [(index, cosine), ...]."""
        text = self.encode_texts([query], normalize=True)[0]
        scores = self.encode_images(images, batch_size=batch_size, normalize=True) @ text
        order = np.argsort(-scores, kind="stable")
        return [(int(i), float(scores[i])) for i in order]

    def __repr__(self) -> str:
        return (f"Bundle({self.folder!r}, model={self.info.get('model')!r}, image_size={self.image_size}, "
                f"context_length={self.context_length}, image_encoder={self.image_encoder_name!r})")
