"""The bundle's image preprocessing (`preprocess.json`) in PIL and numpy, no torch.

    pre = Preprocessor.from_description(json.loads(raw))   # clip.transforms.describe_transforms output
    batch = pre([pil_a, pil_b])                             # float32 [2, 3, S, S]

What it does, step by step, as the description spells it out (clip.transforms documents the same geometry):
convert to RGB; resize so the shorter side is `size` and the longer `floor(size * long / short)` with PIL's
bicubic filter (antialiased when shrinking: PIL filters over the whole source footprint), the reference
implementation the description names and the one torchvision's eval transform calls for PIL inputs; centre
crop at `round((side - size) / 2)` (Python's round, half to even); `pixel * scale` then `(x - mean) / std`
per channel in float32; CHW. tests/test_runtime.py checks it against `clip.transforms.eval_transform` on real
images. A description this module cannot honour exactly is refused (ValueError naming the key), never
approximated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

DESCRIPTION_FORMAT = "clip-pipeline/preprocess/v1"  # the format clip.transforms.describe_transforms writes


@dataclass(frozen=True)
class Preprocessor:
    size: int
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> Preprocessor:
        if not isinstance(desc, dict) or desc.get("format") != DESCRIPTION_FORMAT:
            found = desc.get("format") if isinstance(desc, dict) else type(desc).__name__
            raise ValueError(f"preprocess description: format {found!r}, expected {DESCRIPTION_FORMAT!r}")
        try:
            resize, crop = desc["resize"], desc["center_crop"]
            size = int(resize["size"])
            checks = {
                "resize.mode": (resize.get("mode"), "shortest_side"),
                "resize.interpolation": (resize.get("interpolation"), "bicubic"),
                "resize.antialias": (resize.get("antialias"), True),
                "center_crop.height": (crop.get("height"), size),
                "center_crop.width": (crop.get("width"), size),
                "input.channel_order": (desc.get("input", {}).get("channel_order"), "RGB"),
                "output.layout": (desc.get("output", {}).get("layout", "CHW"), "CHW"),
            }
            for key, (found, expected) in checks.items():
                if found != expected:
                    raise ValueError(f"preprocess description: {key} is {found!r}; this runtime supports {expected!r}")
            mean = tuple(float(v) for v in desc["mean"])
            std = tuple(float(v) for v in desc["std"])
            scale = float(desc["scale"])
        except KeyError as exc:
            raise ValueError(f"preprocess description is missing key {exc.args[0]!r}") from None
        if size <= 0 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"preprocess description: bad size/mean/std ({size}, {mean}, {std})")
        return cls(size=size, scale=scale, mean=mean, std=std)  # type: ignore[arg-type]

    def resize_and_crop(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """RGB, shortest side to `size` (bicubic), centre crop `size` x `size`."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)  # floor, as torchvision computes the long side
        new_w, new_h = (self.size, new_long) if width <= height else (new_long, self.size)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def to_array(self, image: PIL.Image.Image) -> np.ndarray:
        """One image -> float32 [3, size, size], normalised."""
        pixels = np.asarray(self.resize_and_crop(image), dtype=np.float32) * np.float32(self.scale)  # [S, S, 3]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))

    def __call__(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """float32 [N, 3, size, size]."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if len(images) == 0:
            return np.zeros((0, 3, self.size, self.size), dtype=np.float32)
        return np.stack([self.to_array(image) for image in images])
