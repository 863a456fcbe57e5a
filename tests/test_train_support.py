"""Helpers for the training tests: learnable synthetic shards in the documented layout, a tiny config.

Images are determined by their captions ("a red square" is a red square on grey, at a random place), so a
model can learn to match them. Shards are written with `tarfile` (an independent tar writer, members
`{key}.jpg`, `{key}.txt`, `{key}.json`) plus a `manifest.json` in the format of docs/formats.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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


def make_samples(n: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    rng = np.random.default_rng(seed)
    samples = []
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        colour, shape = combos[int(rng.integers(len(combos)))]
        samples.append((f"{i:09d}", make_image(colour, shape, rng), f"a {colour} {shape}"))
    return samples


def write_tar(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, caption in samples:
            meta = json.dumps({"key": key, "caption": caption}).encode()
            for ext, data in (("jpg", jpg), ("txt", caption.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))


def write_manifest(folder: Path, names: list[str], counts: list[int]) -> dict[str, Any]:
    shards = []
    for name, count in zip(names, counts, strict=True):
        data = (folder / name).read_bytes()
        shards.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    digest = hashlib.sha256()
    for s in sorted(shards, key=lambda s: s["name"]):
        digest.update(f"{s['name']}\t{s['samples']}\t{s['bytes']}\t{s['sha256']}\n".encode())
    manifest = {"format": "clip-pipeline/shards/v1", "data_version": digest.hexdigest(),
                "total_samples": sum(counts), "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "sizes.json").write_text(json.dumps(dict(zip(names, counts, strict=True))))
    return manifest


def make_shards(folder: Path, n: int = 256, per_shard: int = 64, seed: int = 0) -> list[str]:
    """n learnable samples in shards of per_shard; returns all keys in write order."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = make_samples(n, seed)
    names, counts = [], []
    for i in range(0, n, per_shard):
        name = f"shard-{i // per_shard:05d}.tar"
        write_tar(folder / name, samples[i:i + per_shard])
        names.append(name)
        counts.append(len(samples[i:i + per_shard]))
    write_manifest(folder, names, counts)
    return [k for k, _, _ in samples]


def tiny_overrides(data: str, output: str, **extra: Any) -> list[str]:
    """`--set` overrides for a tiny fast run (32 px, 1 layer per tower, vocab 600)."""
    base = {
        "train.data": data,
        "train.output": output,
        "train.model": "tiny-vit",
        "train.model_overrides": "{image_size: 32, patch_size: 8, vision_layers: 1, text_layers: 1, "
                                 "vision_width: 64, text_width: 64, text_heads: 2, embed_dim: 32, context_length: 16}",
        "train.tokenizer.vocab_size": 600,
        "train.tokenizer.context_length": 16,
        "train.batch_size": 16,
        "train.epochs": 1,
        "train.num_workers": 0,
        "train.shuffle_buffer": 32,
        "train.warmup_steps": 2,
        "train.lr": 2e-3,
        "train.log_every": 2,
        "train.checkpoint_every": 4,
        "tracking.enabled": False,
        "compute.device": "cpu",
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]
