"""Image preprocessing for training and evaluation (torchvision.transforms.v2), and its portable description.

    train = train_transform(224)            # random resized crop (scale 0.9-1.0), bicubic, normalise
    evaluate = eval_transform(224)          # shortest side -> 224 bicubic, centre crop 224, normalise
    x = evaluate(pil_image)                 # float32 [3, 224, 224]
    desc = describe_transforms(224)         # JSON-able; the export stage writes it next to the ONNX model
    same = transform_from_description(desc)

Inputs: PIL images (any mode; converted to RGB first) or uint8 tensors [C, H, W] with C = 1 or 3.
For PIL inputs resizing is done by PIL (bicubic, which filters over the whole source footprint when
shrinking, i.e. antialiased), exactly as open_clip's eval transform does; for tensors torchvision's
antialiased bicubic is used, which agrees with PIL to about one grey level.

The geometry of the eval transform, for a non-Python runtime (also spelled out in the description):
the shorter side becomes `size` and the longer one `floor(size * long / short)`; the centre crop starts
at `top = round((height - size) / 2)`, `left = round((width - size) / 2)` (Python's round, half to even);
pixel values are divided by 255, then `(x - mean) / std` per RGB channel; layout CHW, float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torchvision.transforms import InterpolationMode, v2

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DESCRIPTION_FORMAT = "clip-pipeline/preprocess/v1"


class _ToRGB(v2.Transform):
    """PIL: convert to RGB. Tensor: check [1|3, H, W] and repeat a grey channel to three."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            return inpt if inpt.mode == "RGB" else inpt.convert("RGB")
        if isinstance(inpt, torch.Tensor):
            if inpt.ndim != 3 or inpt.shape[0] not in (1, 3):
                raise ValueError(f"image tensor must be [C, H, W] with C = 1 or 3, got shape {tuple(inpt.shape)}")
            if inpt.dtype != torch.uint8:
                raise ValueError(f"image tensor must be uint8 (0-255), got {inpt.dtype}")
            return inpt.expand(3, -1, -1) if inpt.shape[0] == 1 else inpt
        return inpt


def _check_size(image_size: int) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _check_channels(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {values!r}")
    if name == "std" and any(v <= 0 for v in values):
        raise ValueError(f"std values must be positive, got {values!r}")
    return values  # type: ignore[return-value]


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToImage(),  # PIL -> uint8 tv_tensors.Image [3, H, W]
        v2.ToDtype(torch.float32, scale=True),  # / 255
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def train_transform(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    scale: tuple[float, float] = (0.9, 1.0),
) -> v2.Compose:
    """Random resized crop (area fraction in `scale`, aspect ratio 3/4-4/3) to image_size, bicubic; no flip
    (captions say 'left' and 'right'). Randomness comes from torch's global generator."""
    image_size = _check_size(image_size)
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale!r}")
    return v2.Compose(
        [
            _ToRGB(),
            v2.RandomResizedCrop(
                image_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            *_to_normalised_tensor(_check_channels("mean", mean), _check_channels("std", std)),
        ]
    )


def eval_transform(
    image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> v2.Compose:
    """Shortest side to image_size (bicubic), centre crop image_size x image_size, normalise."""
    image_size = _check_size(image_size)
    return v2.Compose(
        [
            _ToRGB(),
            v2.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalised_tensor(_check_channels("mean", mean), _check_channels("std", std)),
        ]
    )


def describe_transforms(
    image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> dict[str, Any]:
    """The eval preprocessing as plain JSON data, precise enough to re-implement outside Python."""
    image_size = _check_size(image_size)
    return {
        "format": DESCRIPTION_FORMAT,
        "input": {"channel_order": "RGB", "convert_to_rgb": True, "dtype": "uint8", "value_range": [0, 255]},
        "resize": {
            "mode": "shortest_side",
            "size": image_size,
            "long_side": "floor(size * long / short)",
            "interpolation": "bicubic",
            "antialias": True,
            "reference_implementation": "PIL.Image.resize(resample=BICUBIC)",
        },
        "center_crop": {"height": image_size, "width": image_size, "offset": "round((side - crop) / 2)"},
        "scale": 1.0 / 255.0,  # applied before mean/std: values in [0, 1]
        "mean": list(_check_channels("mean", mean)),
        "std": list(_check_channels("std", std)),
        "output": {"layout": "CHW", "dtype": "float32", "shape": [3, image_size, image_size]},
    }


def transform_from_description(desc: dict[str, Any]) -> v2.Compose:
    """Rebuild the eval transform from describe_transforms() output; refuses anything it cannot honour."""
    if not isinstance(desc, dict) or desc.get("format") != DESCRIPTION_FORMAT:
        found = desc.get("format") if isinstance(desc, dict) else type(desc).__name__
        raise ValueError(f"not a {DESCRIPTION_FORMAT} preprocessing description (format: {found!r})")
    try:
        resize, crop = desc["resize"], desc["center_crop"]
        size = resize["size"]
        if resize.get("mode") != "shortest_side" or resize.get("interpolation") != "bicubic":
            raise ValueError(
                f"unsupported resize: mode {resize.get('mode')!r}, interpolation {resize.get('interpolation')!r}"
            )
        if crop.get("height") != size or crop.get("width") != size:
            raise ValueError(f"center_crop {crop.get('height')}x{crop.get('width')} differs from resize size {size}")
        if desc.get("input", {}).get("channel_order") != "RGB":
            raise ValueError(f"unsupported channel order {desc.get('input', {}).get('channel_order')!r}")
        if abs(float(desc.get("scale", 0)) - 1 / 255) > 1e-12:
            raise ValueError(f"unsupported scale {desc.get('scale')!r}; expected 1/255")
        return eval_transform(int(size), mean=desc["mean"], std=desc["std"])
    except KeyError as exc:
        raise ValueError(f"preprocessing description is missing key {exc.args[0]!r}") from None
