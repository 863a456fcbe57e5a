"""Build models from weights: this project's checkpoints (docs/formats.md "Checkpoints") and OpenAI's released
CLIP files (plain state dicts or TorchScript .pt archives).

    model, tokenizer = build_from_checkpoint(checkpoint_dict, "models/runs/x/final.pt")  # the one way in
    load_openai_state_dict(create_model("RN50"), "RN50.pt")
    create_model_from_config(config_from_state_dict(weights))  # architecture read off OpenAI weights' shapes

`build_from_checkpoint` takes the checkpoint's content, never a location: the read (local or s3://, checked
against its checksums) is clip.formats.checkpoint's `read_checkpoint`, in the caller, so this package knows
nothing of storage or configuration. Loading is strict: any missing, unexpected or wrongly shaped key raises
`StateDictMismatchError` naming the first offenders (`CheckpointMismatchError`, naming the file, from
`build_from_checkpoint`).
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clip.model.config import CLIPConfig, TextConfig, VisionConfig
from clip.model.model import CLIP, create_model_from_config

if TYPE_CHECKING:
    from clip.tokenizer import Tokenizer

# Entries in OpenAI's TorchScript archives that are attributes of the module, not weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


class StateDictMismatchError(ValueError):
    """A state dict that does not fit the model; the message names the first offending keys."""


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        # TorchScript archives hold the module's code next to its data; torch.save archives do not.
        return any(
            re.search(r"(^|/)code/", name) or name.endswith("/constants.pkl") for name in archive.namelist()
        )


def read_weights(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A local file (torch.save'd dict, loaded with weights_only=True, or a TorchScript archive) -> its dict."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if _is_torchscript_archive(path):
        # OpenAI's released .pt files are TorchScript modules; only their state dict is used, no code is run.
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # torch.jit.load is deprecated, still the only reader
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(loaded).__name__}")
    return loaded


def extract_state_dict(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights inside `data`: our checkpoint's `model`, a training `state_dict` (DDP's
    `module.` prefix removed) or `data` itself; OpenAI's non-weight entries dropped."""
    if isinstance(data.get("model"), dict):
        data = data["model"]
    elif isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module.") :]: v for k, v in data.items()}
    return {k: v for k, v in data.items() if k not in _NON_WEIGHT_KEYS}


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], show: int = 5) -> None:
    """Raise StateDictMismatchError unless `state_dict` has exactly the model's keys with its shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", wrong_shape),
        ):
            if items:
                more = f" (+{len(items) - show} more)" if len(items) > show else ""
                parts.append(f"{label} ({len(items)}): {', '.join(items[:show])}{more}")
        raise StateDictMismatchError("state dict does not match the model: " + "; ".join(parts))


def load_openai_state_dict(model: CLIP, source: str | Path | dict[str, Any]) -> CLIP:
    """Copy weights in OpenAI's layout (file or dict) into `model`, strictly; returns the model."""
    state_dict = extract_state_dict(read_weights(source))
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model


def _count_blocks(state_dict: dict[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return len(indices)


def config_from_state_dict(state_dict: dict[str, Any], quick_gelu: bool = True) -> CLIPConfig:
    """Read the architecture off OpenAI-layout weights (the activation cannot be: OpenAI's is QuickGELU)."""
    sd = extract_state_dict(state_dict)
    try:
        if "visual.proj" in sd:  # Vision Transformer
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                image_size=patch * grid,
                layers=_count_blocks(sd, "visual.transformer.resblocks."),
                width=width,
                patch_size=patch,
                mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            )
        else:  # modified ResNet
            spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                image_size=spatial * 32,
                layers=tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)),  # type: ignore[arg-type]
                width=sd["visual.layer1.0.conv1.weight"].shape[0],
                patch_size=None,
            )
        text_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=text_width,
            heads=text_width // 64,
            layers=_count_blocks(sd, "transformer.resblocks."),
            mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        )
        embed_dim = sd["text_projection"].shape[1]
    except KeyError as exc:
        raise StateDictMismatchError(f"not a CLIP state dict in OpenAI's layout: no key {exc}") from None
    bias = sd.get("logit_bias")  # a SigLIP-trained model carries its learned bias
    return CLIPConfig(
        embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu, name="from-weights",
        init_logit_bias=float(bias) if bias is not None else None,
    )


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parts do not fit together (its model_config, its weights, its tokenizer); the message
    is one line and names the checkpoint."""


def build_from_checkpoint(checkpoint: dict[str, Any], source: str = "checkpoint") -> tuple[CLIP, Tokenizer]:
    """(model, tokenizer) of a checkpoint's content (`model`, `model_config`, `tokenizer`; docs/formats.md): the
    model built from its own `model_config`, its weights loaded strictly, in eval mode on the CPU, and its
    tokenizer, which must fit the model (no token id beyond the model's vocabulary, the same context length).
    CheckpointMismatchError naming `source` (the file it was read from) otherwise."""
    from clip.tokenizer import Tokenizer

    missing = [key for key in ("model", "model_config", "tokenizer") if key not in checkpoint]
    if missing:
        raise CheckpointMismatchError(f"{source}: checkpoint lacks key(s) {missing}")
    try:
        model = create_model_from_config(checkpoint["model_config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointMismatchError(f"{source}: bad model_config ({exc})".replace("\n", " ")) from None
    try:
        check_state_dict(model, checkpoint["model"])
    except StateDictMismatchError as exc:
        raise CheckpointMismatchError(
            f"{source}: weights disagree with its model_config ({model.config.name}): {exc}") from None
    model.load_state_dict(checkpoint["model"], strict=True)
    try:
        tokenizer = Tokenizer.from_json(checkpoint["tokenizer"])
    except (TypeError, ValueError) as exc:
        raise CheckpointMismatchError(f"{source}: bad tokenizer ({exc})".replace("\n", " ")) from None
    if tokenizer.vocab_size > model.vocab_size or tokenizer.context_length != model.context_length:
        raise CheckpointMismatchError(
            f"{source}: its tokenizer (vocab {tokenizer.vocab_size}, context {tokenizer.context_length}) does not fit "
            f"its model (vocab {model.vocab_size}, context {model.context_length})")
    return model.eval(), tokenizer
