"""Typed model configuration and the named presets in `clip/model/configs/*.json`.

A config is plain data (`CLIPConfig.to_dict()` / `CLIPConfig.from_dict()`), so a checkpoint carries the
config that rebuilds its module (docs/formats.md, key `model_config`).

    cfg = get_config("tiny-vit", vocab_size=4096)
    cfg.vision.image_size  # 64
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial log temperature multiplier: scale 1 / 0.07


class ModelConfigError(ValueError):
    """A model config that cannot be built; the message names the offending key or name."""


@dataclass
class VisionConfig:
    """Image tower. `layers` as an int builds a Vision Transformer; as four ints, the modified ResNet."""

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768  # ViT: token width; ResNet: stem width (the last stage has width * 32 channels)
    patch_size: int | None = 32  # ViT only
    head_width: int = 64  # attention heads = width // head_width (ResNet: attention pool on width * 32)
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return not isinstance(self.layers, int)


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # x * sigmoid(1.702 x), what OpenAI's released weights were trained with
    name: str = "custom"
    init_logit_scale: float = LOGIT_SCALE_INIT  # initial value of the `logit_scale` parameter (a log)
    # None: no bias parameter (CLIP's softmax loss). A number adds a learned scalar `logit_bias` with that initial
    # value, the b of SigLIP's sigmoid loss (clip/sigmoid_loss.py); it adds a key to the state dict.
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision.layers, list):
            self.vision.layers = tuple(self.vision.layers)  # type: ignore[assignment]
        if self.vision.is_resnet:
            self.vision.patch_size = None  # not used by a ResNet; one canonical form for comparisons
        self.validate()

    def validate(self) -> None:
        v, t = self.vision, self.text
        sizes = [("embed_dim", self.embed_dim)]
        sizes += [(f"vision.{k}", getattr(v, k)) for k in ("image_size", "width", "head_width")]
        sizes += [(f"text.{k}", getattr(t, k)) for k in ("context_length", "vocab_size", "width", "heads", "layers")]
        if not v.is_resnet:
            sizes.append(("vision.patch_size", v.patch_size))
        for key, value in sizes:  # checked first: the rules below do arithmetic on them
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{key} must be a positive integer, got {value!r}")
        for key, value in (("vision.mlp_ratio", v.mlp_ratio), ("text.mlp_ratio", t.mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ModelConfigError(f"{key} must be a positive number, got {value!r}")
        if v.is_resnet:
            if (not isinstance(v.layers, tuple) or len(v.layers) != 4
                    or not all(isinstance(n, int) and n > 0 for n in v.layers)):
                raise ModelConfigError(
                    f"vision.layers must be an int (ViT) or 4 positive ints (ResNet), got {v.layers!r}"
                )
            if v.image_size % 32:
                raise ModelConfigError(
                    f"vision.image_size must be a multiple of 32 for a ResNet, got {v.image_size}"
                )
            if (v.width * 32) % v.head_width:
                raise ModelConfigError(
                    f"vision.width * 32 ({v.width * 32}) is not a multiple of head_width {v.head_width}"
                )
        else:
            if v.layers <= 0:  # type: ignore[operator]
                raise ModelConfigError(f"vision.layers must be positive, got {v.layers}")
            if not v.patch_size or v.image_size % v.patch_size:
                raise ModelConfigError(
                    f"vision.image_size ({v.image_size}) must be a multiple of vision.patch_size ({v.patch_size})"
                )
            if v.width % v.head_width:
                raise ModelConfigError(
                    f"vision.width ({v.width}) is not a multiple of head_width {v.head_width}"
                )
        if t.width % t.heads:
            raise ModelConfigError(f"text.width ({t.width}) is not a multiple of text.heads ({t.heads})")
        scalars = [("init_logit_scale", self.init_logit_scale)]
        if self.init_logit_bias is not None:
            scalars.append(("init_logit_bias", self.init_logit_bias))
        for key, value in scalars:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ModelConfigError(f"{key} must be a finite number, got {value!r}")
        for key, value in (
            ("embed_dim", self.embed_dim),
            ("text.vocab_size", t.vocab_size),
            ("text.context_length", t.context_length),
            ("text.layers", t.layers),
        ):
            if value <= 0:
                raise ModelConfigError(f"{key} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["vision"]["layers"], tuple):
            data["vision"]["layers"] = list(data["vision"]["layers"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        """Build from `to_dict()` output (or a preset file); unknown keys are errors, naming the key."""
        if not isinstance(data, dict):
            raise ModelConfigError(f"model config must be a dict, got {type(data).__name__}")
        data = dict(data)
        vision = _sub_config(VisionConfig, data.pop("vision", {}), "vision")
        text = _sub_config(TextConfig, data.pop("text", {}), "text")
        known = {f.name for f in dataclasses.fields(cls)} - {"vision", "text"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(
                f"unknown model config key(s) {unknown}; known: {sorted(known | {'vision', 'text'})}"
            )
        return cls(vision=vision, text=text, **data)


def _sub_config(kind: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ModelConfigError(f"model config {prefix!r} must be a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelConfigError(
            f"unknown model config key(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(known)}"
        )
    return kind(**data)


def _preset_dir() -> Any:
    return resources.files("clip.model").joinpath("configs")


def list_models() -> list[str]:
    """Names of the presets shipped in clip/model/configs/."""
    files = _preset_dir().iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def apply_overrides(cfg: CLIPConfig, **overrides: Any) -> CLIPConfig:
    """Return a copy with overrides applied.

    Top-level fields by name (`embed_dim`, `quick_gelu`); tower fields by `vision_<field>` / `text_<field>`,
    or by the bare field name when only one tower has it (`image_size`, `patch_size`, `vocab_size`,
    `context_length`).
    """
    data = cfg.to_dict()
    vision_keys = {f.name for f in dataclasses.fields(VisionConfig)}
    text_keys = {f.name for f in dataclasses.fields(TextConfig)}
    top_keys = {f.name for f in dataclasses.fields(CLIPConfig)} - {"vision", "text"}
    for key, value in overrides.items():
        if key in top_keys:
            data[key] = value
        elif key.startswith("vision_") and key[len("vision_") :] in vision_keys:
            data["vision"][key[len("vision_") :]] = value
        elif key.startswith("text_") and key[len("text_") :] in text_keys:
            data["text"][key[len("text_") :]] = value
        elif key in vision_keys and key not in text_keys:
            data["vision"][key] = value
        elif key in text_keys and key not in vision_keys:
            data["text"][key] = value
        elif key in vision_keys and key in text_keys:
            raise ModelConfigError(f"override {key!r} is ambiguous; say vision_{key} or text_{key}")
        else:
            raise ModelConfigError(
                f"unknown model override {key!r}; use one of {sorted(top_keys)}, vision_<field> for "
                f"{sorted(vision_keys)} or text_<field> for {sorted(text_keys)}"
            )
    return CLIPConfig.from_dict(data)


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    """The named preset (see `list_models()`), with overrides applied (see `apply_overrides`)."""
    known = list_models()
    if name not in known:
        raise ModelConfigError(f"unknown model config {name!r}; known: {', '.join(known)}")
    data = json.loads(_preset_dir().joinpath(f"{name}.json").read_text())
    cfg = CLIPConfig.from_dict(data)
    return apply_overrides(cfg, **overrides) if overrides else cfg
