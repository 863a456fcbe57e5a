"""Synthetic shards for the tests (no tests here), in the layouts of docs/formats.md.

* Raw pools (dedup and shard tests): `raw-NNNNN.tar` shards of (jpg, txt, json) samples as the collect stage
  writes them, and a `keep.parquet` as the dedup stage writes it.
* Training shards (training tests): learnable samples (tests.support.images.make_image) written with `tarfile`
  (an independent tar writer, members `{key}.jpg`, `{key}.txt`, `{key}.json`) plus `manifest.json` and
  `sizes.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clip.formats.raw import caption_digest
from clip.imagehash import phash_hex
from tests.support.images import COLOURS, SHAPES, jpeg_bytes, make_image, random_scene

# ------------------------------------------------------------------------------------------------------
# raw pools (dedup and shard tests)


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
    """A keep.parquet as the dedup stage writes it (key, shard, sha256 and caption digest from each sample's raw
    JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dedup_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted(keep)
    sha256 = [json.loads(samples[k]["json"])["sha256"] for k in keys]
    captions = [caption_digest(json.loads(samples[k]["json"])["caption"]) for k in keys]
    pq.write_table(pa.table({"key": keys, "shard": [keep[k] for k in keys], "sha256": sha256,
                             "caption_digest": captions}), dedup_dir / "keep.parquet")


# ------------------------------------------------------------------------------------------------------
# training shards (training tests)


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

