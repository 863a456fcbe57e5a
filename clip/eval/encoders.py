"""The model under evaluation, behind one small protocol: an export bundle (default) or a training checkpoint.

    encoder = BundleEncoder.load("models/bundle")             # what ships is what is measured (onnxruntime)
    encoder = CheckpointEncoder.load("models/runs/x/final.pt")  # a PyTorch checkpoint (docs/formats.md)
    pixels = encoder.preprocess(images)                        # float32 [N, 3, S, S]
    embeddings, features = encoder.forward_pixels(pixels)      # [N, E] projected, [N, W] before the projection

What was chosen, and why:
- **Preprocessing is separate from the forward pass** (`preprocess` on PIL images, `forward_pixels` on a batch),
  so the engine (clip.eval.extract) decodes and preprocesses in a thread pool while the encoder runs: the loader
  never limits. Both halves are what the bundle's `preprocess.json` / `clip.transforms.eval_transform` specify.
- **One forward gives both outputs.** Zero-shot needs the projected embedding, the linear probe the features
  before the projection (appendix A.3); one pass yields both. The features are what the export stage's ONNX
  "features" output holds: for a ViT the class token after `ln_post` (before `proj`); for the modified ResNet
  the attention-pooled vector *before* `attnpool.c_proj` (the ResNet's projection is that layer), captured with
  a forward pre-hook so the eager tower runs unchanged.
- **float32, no grad, batches.** Embeddings come back unnormalised; callers normalise.
- **`fingerprint`** names the weights (the checkpoint's sha256; for a bundle the manifest's checkpoint hash and
  the image encoder file's hash, so an int8 bundle is cached apart): the feature cache's key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import PIL.Image

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import MissingInputError


class Encoder(Protocol):
    name: str
    fingerprint: str
    logit_scale: float
    image_size: int

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> np.ndarray: ...

    def forward_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def encode_images(encoder: Encoder, images: Sequence[PIL.Image.Image]) -> np.ndarray:
    """float32 [N, E]: projected, unnormalised image embeddings."""
    return encoder.forward_pixels(encoder.preprocess(images))[0]


def image_features(encoder: Encoder, images: Sequence[PIL.Image.Image]) -> np.ndarray:
    """float32 [N, W]: the image features before the projection (linear probe input)."""
    return encoder.forward_pixels(encoder.preprocess(images))[1]


class BundleEncoder:
    """An export bundle run with onnxruntime (clip.runtime): the default, since it is what ships."""

    def __init__(self, bundle, text_batch_size: int = 256) -> None:  # bundle: clip.runtime.Bundle
        self.bundle = bundle
        self.name = f"bundle:{bundle.folder}"
        from clip.formats.bundle import TEXT_ENCODER_NAME

        files = bundle.manifest.files
        parts = [str(bundle.info.get("checkpoint_sha256") or ""),
                 str(files.get(bundle.image_encoder_name, {}).get("sha256", "")),
                 str(files.get(TEXT_ENCODER_NAME, {}).get("sha256", ""))]
        self.fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
        self.logit_scale = float(bundle.logit_scale)
        self.image_size = int(bundle.image_size)
        self.text_batch_size = text_batch_size

    @classmethod
    def load(cls, folder: str, storage_cfg: StorageConfig | None = None, threads: int | None = None) -> BundleEncoder:
        from clip.formats.bundle import BUNDLE_MANIFEST_NAME
        from clip.runtime import Bundle

        if not storage.exists(storage.join(folder, BUNDLE_MANIFEST_NAME), storage_cfg):
            raise MissingInputError(f"no export bundle at {folder} (evaluate.bundle): run the export stage, "
                                    "or set evaluate.checkpoint to evaluate a checkpoint")
        return cls(Bundle.load(folder, storage_cfg, threads=threads))

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        return self.bundle.preprocess(list(images))

    def forward_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        session = self.bundle.image_session
        embeddings, features = session.run(["embedding", "features"], {"image": pixels.astype(np.float32, copy=False)})
        return embeddings.astype(np.float32, copy=False), features.astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.bundle.encode_texts(list(texts), batch_size=self.text_batch_size).astype(np.float32, copy=False)


class CheckpointEncoder:
    """A training checkpoint (`final.pt` / `step-*.pt`) run eagerly in PyTorch, float32, no grad."""

    def __init__(self, model, tokenizer, fingerprint: str, name: str, device: str = "cpu",
                 text_batch_size: int = 256) -> None:
        import torch

        from clip.model.vision import ModifiedResNet
        from clip.transforms import eval_transform

        self.torch = torch
        self.model = model.float().eval().to(device)
        self.device = device
        self.tokenizer = tokenizer
        self.fingerprint, self.name = fingerprint, name
        self.image_size = int(model.image_size)
        self.logit_scale = float(model.scale().detach())
        self.text_batch_size = text_batch_size
        self.transform = eval_transform(self.image_size)
        self._captured: list = []
        visual = self.model.visual
        if isinstance(visual, ModifiedResNet):  # features = the input of the final projection c_proj
            visual.attnpool.c_proj.register_forward_pre_hook(lambda _m, args: self._captured.append(args[0]))
        else:  # ViT: features = ln_post's output, which then meets `proj`
            visual.ln_post.register_forward_hook(lambda _m, _args, out: self._captured.append(out))

    @classmethod
    def load(cls, reference: str, storage_cfg: StorageConfig | None = None, device: str = "cpu") -> CheckpointEncoder:
        """The checkpoint `reference` names (a file or a run folder: clip.formats.checkpoint `resolve_checkpoint`),
        read, checked and built strictly (`read_checkpoint`, clip.model `build_from_checkpoint`)."""
        from clip.formats.checkpoint import read_checkpoint, resolve_checkpoint
        from clip.model import build_from_checkpoint

        uri = resolve_checkpoint(reference, storage_cfg, "evaluate.checkpoint")
        file = read_checkpoint(uri, storage_cfg, key="evaluate.checkpoint")
        model, tokenizer = build_from_checkpoint(file.content, uri)
        return cls(model, tokenizer, fingerprint=file.sha256[:24], name=f"checkpoint:{uri}", device=device)

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return np.stack([self.transform(image).numpy() for image in images]).astype(np.float32, copy=False)

    def forward_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        self._captured.clear()
        with torch.inference_mode():
            embeddings = self.model.encode_image(torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device))
        if len(self._captured) != 1:
            raise RuntimeError(f"expected one captured feature tensor, got {len(self._captured)}")
        features = self._captured.pop()
        return (embeddings.float().cpu().numpy(), features.float().cpu().numpy())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        texts = list(texts)
        parts = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.text_batch_size):
                tokens = self.tokenizer(texts[i:i + self.text_batch_size], self.model.context_length)
                parts.append(self.model.encode_text(tokens.to(self.device)).float().cpu().numpy())
        width = self.model.config.embed_dim
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)


def load_encoder(bundle: str | None, checkpoint: str | None, storage_cfg: StorageConfig | None = None,
                 device: str = "cpu", threads: int | None = None) -> Encoder:
    """`checkpoint` when set (PyTorch), else the export bundle at `bundle` (onnxruntime)."""
    if checkpoint:
        return CheckpointEncoder.load(checkpoint, storage_cfg, device=device)
    if not bundle:
        raise ValueError("evaluate.bundle and evaluate.checkpoint are both unset: nothing to evaluate")
    return BundleEncoder.load(bundle, storage_cfg, threads=threads)
