"""Image validation and re-encoding shared by all collection paths (clip.collect.images)."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clip.collect.images import ImageRejected, encode_image, process_image
from clip.config import FetchConfig
from clip.imagehash import hamming, hex_to_int, phash64

CFG = FetchConfig(max_side=128, min_size=32, max_aspect_ratio=3.0, jpeg_quality=90)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    # Smooth noise (upsampled), so that JPEG round trips keep the pHash stable.
    small = np.random.default_rng(seed).integers(0, 255, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def test_large_jpeg_is_shrunk_keeping_ratio_and_hashed() -> None:
    source = _noise(1000, 600)
    result = process_image(_encode(source), CFG)
    assert (result.width, result.height) == (128, 77)
    stored = Image.open(io.BytesIO(result.jpeg))
    assert stored.format == "JPEG" and stored.mode == "RGB" and stored.size == (128, 77)
    assert result.sha256 == hashlib.sha256(result.jpeg).hexdigest()
    assert hamming(hex_to_int(result.phash), phash64(source)) <= 6  # same picture, other size and encoding


def test_small_images_are_not_upscaled_and_modes_become_rgb() -> None:
    gray = process_image(_encode(_noise(60, 40).convert("L"), "PNG"), CFG)
    assert (gray.width, gray.height) == (60, 40)
    rgba = Image.new("RGBA", (50, 50), (255, 0, 0, 0))  # fully transparent red -> white
    pixel = Image.open(io.BytesIO(process_image(_encode(rgba, "PNG"), CFG).jpeg)).getpixel((25, 25))
    assert min(pixel) > 240
    assert encode_image(_noise(64, 64), CFG).width == 64


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    result = process_image(_encode(_noise(120, 60), exif=exif), CFG)
    assert (result.width, result.height) == (60, 120)


@pytest.mark.parametrize(
    ("data", "cfg", "reason"),
    [
        (b"", CFG, "not_an_image"),
        (b"<html>not an image</html>", CFG, "not_an_image"),
        (_encode(_noise(20, 100)), CFG, "too_small"),
        (_encode(_noise(400, 100)), CFG, "aspect_ratio"),
        (_encode(_noise(300, 300)), FetchConfig(max_pixels=50_000), "decompression_bomb"),
        (_encode(_noise(300, 300, seed=3))[:2000], CFG, "truncated"),
    ],
)
def test_rejections_carry_reasons(data: bytes, cfg: FetchConfig, reason: str) -> None:
    with pytest.raises(ImageRejected) as err:
        process_image(data, cfg)
    assert err.value.reason == reason


def test_bomb_is_refused_before_decoding() -> None:
    # A 20000 x 20000 PNG header over a tiny body: refused from the header, no 1.2 GB allocation.
    png = bytearray(_encode(Image.new("1", (8, 8)), "PNG"))
    struct.pack_into(">II", png, 16, 20000, 20000)  # IHDR width, height
    struct.pack_into(">I", png, 29, zlib.crc32(png[12:29]))  # IHDR checksum over type + data
    huge = bytes(png)
    with pytest.raises(ImageRejected) as err:
        process_image(huge, FetchConfig(max_pixels=89_478_485))
    assert err.value.reason == "decompression_bomb"
