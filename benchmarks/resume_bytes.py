"""Bytes a resume reads before its first batch: ranged shard reads (shard indexes) vs the full-read path.

A data version of `--shards` x `--per-shard` synthetic JPEG samples is published once by the real shard stage
(raw pool -> keep.parquet -> clip.shards.stage.run, which writes the shard indexes) under .bench/resume_bytes/.
Then every logical stream is restarted in the middle of epoch 0 (position `stream_length // 2`, as a resume
from a mid-epoch checkpoint does) and the tar bytes it reads until its first sample is handed out are counted,
twice in the same run:
- ranged: the published manifest (every shard indexed): each stream opens the piece holding the first sample
  of its shuffle window at that sample's offset (index objects counted separately);
- full read: the same manifest with the index fields removed (a version published before indexes): each
  stream reads its shards from byte 0 and skips the samples before its window.

    .venv/bin/python benchmarks/resume_bytes.py                         # 8 shards x 500, 16 streams, window 256
    .venv/bin/python benchmarks/resume_bytes.py --streams 4 --window 1000

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip.config import ComputeConfig, ShardConfig, StorageConfig  # noqa: E402
from clip.formats.dedup import write_keep_list  # noqa: E402
from clip.formats.manifest import Manifest, read_manifest  # noqa: E402
from clip.formats.raw import RawSample, raw_shard_name, write_raw_shard  # noqa: E402
from clip.shards import stage as shard_stage  # noqa: E402
from clip.train.streams import RawStream, StreamPlan, StreamStats, open_uri, shuffled_stream  # noqa: E402


def scene(rng: np.random.Generator, width: int = 160, height: int = 120) -> bytes:
    """A smooth colour field plus noise as JPEG (compresses like a small photo, ~10 KB)."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def publish_version(root: Path, shards: int, per_shard: int) -> Manifest:
    """Raw pool + keep-list + the shard stage (skipped when already published with these sizes)."""
    out = root / "shards"
    if (out / "latest.json").exists():
        manifest = read_manifest(str(out))
        if len(manifest.shards) == shards and manifest.total_samples == shards * per_shard:
            return manifest
    rng = np.random.default_rng(0)
    raw, keys, raw_names, sha = root / "raw", [], [], []
    raw.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            key, jpeg = f"{i:09d}", scene(rng)
            digest = hashlib.sha256(jpeg).hexdigest()
            samples.append(RawSample(key, jpeg, f"a picture number {i}", {"key": key, "sha256": digest}))
            keys.append(key), raw_names.append(raw_shard_name(shard)), sha.append(digest)
        with open(raw / raw_shard_name(shard), "wb") as handle:
            write_raw_shard(handle, samples)
    write_keep_list(str(root / "dedup"), keys, raw_names, sha)
    cfg = ShardConfig(input_dir=str(raw), dedup_dir=str(root / "dedup"), output=str(out),
                      samples_per_shard=per_shard, staging_dir=str(root / "staging"))
    shard_stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig())
    return read_manifest(str(out))


class CountingOpener:
    """Opens through clip.storage (as training does) and counts the bytes read, per object kind."""

    def __init__(self) -> None:
        self.tar_bytes = self.index_bytes = 0

    def __call__(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        return _Counted(open_uri(uri, start=start, end=end), self, "tar_bytes" if uri.endswith(".tar") else
                        "index_bytes")


class _Counted:
    def __init__(self, inner: IO[bytes], counter: CountingOpener, field: str) -> None:
        self.inner, self.counter, self.field = inner, counter, field

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        setattr(self.counter, self.field, getattr(self.counter, self.field) + len(data))
        return data

    def close(self) -> None:
        self.inner.close()


def resume_reads(plan: StreamPlan, window: int) -> dict[str, Any]:
    """Every stream restarted at the middle of epoch 0: bytes read until its first sample, and the time."""
    per_stream, index_bytes, keys = [], 0, []
    started = time.perf_counter()
    for stream in range(plan.num_streams):
        counter = CountingOpener()
        position = plan.stream_length(stream) // 2
        first = next(shuffled_stream(RawStream(plan, 0, stream, counter, StreamStats()), window, position))
        per_stream.append(counter.tar_bytes)
        index_bytes += counter.index_bytes
        keys.append((first[0], first[1]))
    return {"tar_bytes": sum(per_stream), "index_bytes": index_bytes, "per_stream_tar_bytes": per_stream,
            "seconds": time.perf_counter() - started, "first_samples": keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--window", type=int, default=256, help="train.shuffle_buffer")
    parser.add_argument("--root", default=".bench/resume_bytes")
    args = parser.parse_args()

    manifest = publish_version(Path(args.root), args.shards, args.per_shard)
    plan = StreamPlan(manifest.shards, args.streams, seed=0, data_version=manifest.data_version)
    ranged = resume_reads(plan, args.window)
    full = resume_reads(replace(plan, shards=tuple(replace(s, index="", index_sha256="", index_uri="")
                                                   for s in plan.shards)), args.window)
    if ranged["first_samples"] != full["first_samples"]:
        raise SystemExit("the two paths resumed at different samples")
    ranged_total = ranged["tar_bytes"] + ranged["index_bytes"]
    print(f"data: {len(manifest.shards)} shards, {manifest.total_samples} samples, {manifest.bytes / 1e6:.1f} MB; "
          f"{args.streams} streams, window {args.window}, resume at the middle of epoch 0")
    print(f"{'path':<10} {'tar MB':>8} {'index MB':>9} {'seconds':>8}")
    for name, result in (("full read", full), ("ranged", ranged)):
        print(f"{name:<10} {result['tar_bytes'] / 1e6:>8.2f} {result['index_bytes'] / 1e6:>9.3f} "
              f"{result['seconds']:>8.2f}")
    ratio = full["tar_bytes"] / max(1, ranged_total)
    print(f"full read / ranged (index bytes included): {ratio:.1f}x")
    print(json.dumps({
        "benchmark": "resume_bytes", "shards": len(manifest.shards), "samples": manifest.total_samples,
        "data_bytes": manifest.bytes, "streams": args.streams, "window": args.window,
        "full_read_tar_bytes": full["tar_bytes"], "ranged_tar_bytes": ranged["tar_bytes"],
        "ranged_index_bytes": ranged["index_bytes"], "full_read_s": round(full["seconds"], 3),
        "ranged_s": round(ranged["seconds"], 3), "ratio": round(ratio, 2),
    }))


if __name__ == "__main__":
    main()
