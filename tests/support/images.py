"""Synthetic pictures for the tests (no tests here).

* Dedup and shard tests: random scenes (gradient background, filled shapes, a noise texture patch) so the pHash
  has real structure to look at, and the edits that make near duplicates of them: re-encoded, resized or
  slightly cropped.
* Training tests: images determined by their captions ("a red square" is a red square on grey, at a random
  place), so a model can learn to match them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def random_scene(rng: np.random.Generator, size: tuple[int, int] = (160, 128)) -> Image.Image:
    width, height = size
    # Background: a linear gradient between two random colours in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = c0[None, None, :] * (1 - ramp[..., None]) + c1[None, None, :] * ramp[..., None]
    # A coarse noise texture (upsampled), so images differ in low frequencies too.
    coarse = rng.normal(0, 40, (6, 6, 3))
    texture = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float64) - 128
    pixels = np.clip(pixels + texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        w, h = rng.uniform(width * 0.1, width * 0.5), rng.uniform(height * 0.1, height * 0.5)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        box = [x0, y0, x0 + w, y0 + h]
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=colour)
    # Fine noise on top, as camera images have.
    noise = rng.normal(0, 6, (height, width, 3))
    arr = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").filter(ImageFilter.GaussianBlur(0.6))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def reencode(image: Image.Image, quality: int) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(image, quality))).convert("RGB")


def resized(image: Image.Image, scale: float) -> Image.Image:
    w, h = image.size
    return image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BILINEAR)


def cropped(image: Image.Image, fraction: float) -> Image.Image:
    """Crop `fraction` of each dimension in total, split between both sides."""
    w, h = image.size
    dx, dy = round(w * fraction / 2), round(h * fraction / 2)
    return image.crop((dx, dy, w - dx, h - dy))


# ------------------------------------------------------------------------------------------------------
# learnable captioned shapes (training tests)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle", "triangle")


def make_image(colour: str, shape: str, rng: np.random.Generator, size: int = 40) -> bytes:
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 4, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()

