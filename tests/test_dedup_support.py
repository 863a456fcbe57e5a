"""Test data for the dedup and shard tests (no tests here): natural-ish images, planted duplicates, raw shards.

Images are random scenes (gradient background, filled shapes, a noise texture patch) so the pHash has real
structure to look at; near duplicates are the same scene re-encoded, resized or slightly cropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clip.imagehash import phash_hex


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


def sample_record(key: str, image: Image.Image, caption: str, quality: int = 90,
                  source: str = "test") -> dict[str, bytes]:
    """One raw sample's members {ext: bytes} per docs/formats.md."""
    data = jpeg_bytes(image, quality)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    meta = {"key": key, "url": f"http://127.0.0.1/{key}.jpg", "caption": caption, "query": "test",
            "source": source, "width": decoded.width, "height": decoded.height,
            "sha256": hashlib.sha256(data).hexdigest(), "phash": phash_hex(decoded)}
    return {"jpg": data, "txt": caption.encode(), "json": json.dumps(meta).encode()}


def write_raw_shards(folder: Path, samples: list[tuple[str, dict[str, bytes]]], per_shard: int) -> list[Path]:
    """Write raw-NNNNN.tar shards with `per_shard` samples each; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(0, len(samples), per_shard):
        path = folder / f"raw-{index // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, members in samples[index:index + per_shard]:
                for ext in ("jpg", "txt", "json"):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(members[ext])
                    tar.addfile(info, io.BytesIO(members[ext]))
        paths.append(path)
    return paths


def write_unique_pool(folder: Path, num_samples: int, per_shard: int, seed: int = 0,
                      size: tuple[int, int] = (64, 48)) -> dict[str, dict[str, bytes]]:
    """Raw shards of `num_samples` distinct small scenes; returns key -> members."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_samples):
        key = f"{i:09d}"
        samples.append((key, sample_record(key, random_scene(rng, size), f"caption {i} ünïcode",
                                           source=f"source{i % 3}")))
    write_raw_shards(folder, samples, per_shard)
    return dict(samples)


def write_keep(dedup_dir: Path, keep: dict[str, str], samples: dict[str, dict[str, bytes]]) -> None:
    """A keep.parquet as the dedup stage writes it (key, shard, sha256 from each sample's raw JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dedup_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted(keep)
    sha256 = [json.loads(samples[k]["json"])["sha256"] for k in keys]
    pq.write_table(pa.table({"key": keys, "shard": [keep[k] for k in keys], "sha256": sha256}),
                   dedup_dir / "keep.parquet")
