"""A real export bundle for the runtime tests (no tests here).

    folder = make_bundle(tmp_path / "bundle")          # tiny-vit, random weights, a small trained tokenizer
    model, tokenizer = build_bundle(tmp_path / "b")    # the same, returning the PyTorch reference

Minimal on purpose: a tokenizer trained on a few captions, `create_model` with random weights (ViT or
ResNet presets), both encoders exported by the export stage's own `clip.export.onnx_export` (the bundle
contract's names, dynamic batch, one file), and `clip.formats.bundle.write_bundle`. No checkpoint and no parity
gate: the runtime tests compare against the returned PyTorch model themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from clip.export.onnx_export import export_image_encoder, export_text_encoder
from clip.formats.bundle import (
    IMAGE_ENCODER_NAME,
    MODEL_CARD_NAME,
    PREPROCESS_NAME,
    TEXT_ENCODER_NAME,
    TOKENIZER_NAME,
    write_bundle,
)
from clip.model import CLIP, create_model
from clip.tokenizer import Tokenizer
from clip.transforms import describe_transforms

CAPTIONS = [
    f"a photo of {n} {c} {s}" for n in ("one", "two", "a") for c in ("red", "green", "blue", "small", "large")
    for s in ("circle", "square", "triangle", "dog", "cat", "car")
]  # fmt: skip


# Prepend to a subprocess's code: `import torch` (and torchvision) then raises, so a torch import on the path shows.
BLOCK_TORCH = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"torch is blocked in this test: {name}")
sys.meta_path.insert(0, _BlockTorch())
"""


def make_bundle(folder: str | os.PathLike[str], model_name: str = "tiny-vit", seed: int = 0) -> str:
    """Build and write a bundle for `model_name` (random weights, seeded) into `folder`; returns the folder."""
    build_bundle(folder, model_name, seed)
    return os.fspath(folder)


def build_bundle(folder: str | os.PathLike[str], model_name: str = "tiny-vit",
                 seed: int = 0) -> tuple[CLIP, Tokenizer]:
    """make_bundle, returning the PyTorch model and tokenizer it exported (the tests' reference)."""
    torch.manual_seed(seed)
    tokenizer = Tokenizer.train(CAPTIONS * 4, vocab_size=700, min_frequency=1)
    model = create_model(model_name, vocab_size=tokenizer.vocab_size).eval()
    size, ctx = model.image_size, model.context_length
    image_onnx, text_onnx = export_image_encoder(model), export_text_encoder(model)
    state = io.BytesIO()
    torch.save(model.state_dict(), state)
    logit_scale = float(model.scale().detach())  # what the export stage writes (CLIP.scale: the one clamp)
    info = {
        "model": model_name, "model_config": model.config.to_dict(), "embed_dim": model.config.embed_dim,
        "image_size": size, "context_length": ctx, "logit_scale": logit_scale,
        "parameters": sum(p.numel() for p in model.parameters()), "data_version": None, "train_run_id": None,
        "checkpoint_sha256": hashlib.sha256(state.getvalue()).hexdigest(), "parity": {},
    }  # fmt: skip
    contents = {
        IMAGE_ENCODER_NAME: image_onnx,
        TEXT_ENCODER_NAME: text_onnx,
        TOKENIZER_NAME: tokenizer.to_json().encode("utf-8"),
        PREPROCESS_NAME: json.dumps(describe_transforms(size), indent=2).encode("utf-8"),
        MODEL_CARD_NAME: f"# {model_name} (test bundle)\n\nRandom weights, built by tests/support/bundles.py.\n".encode(),
    }
    write_bundle(os.fspath(folder), contents, info)
    return model, tokenizer
