"""Sharding throughput: our streaming shard writer vs webdataset's own ShardWriter, same samples, same run.

A raw pool of N JPEG samples (random scenes, 256x192, like the collect stage's output) is written once. Then:
- ours: `clip.shards.write_shards` (members copied by offset from the raw shards into byte-deterministic tars,
  sha256 computed on the way, temp name + rename), 2 writer threads;
- webdataset: `wds.ShardWriter` fed the same samples in the same shuffled order, the bytes read through the
  same offset index (so both pay the same input cost), same samples-per-shard.
Throughput = output tar bytes / wall time. Publishing (rename or upload) is not included in either.

    .venv/bin/python benchmarks/sharding.py                   # 4000 samples, 1000 per shard
    .venv/bin/python benchmarks/sharding.py --n 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from clip.imagehash import phash_hex
from clip.shards.writer import RawIndex, index_raw_members, plan_shards, shuffled_keys, write_shards


def scene(rng: np.random.Generator, width: int = 256, height: int = 192) -> Image.Image:
    """A cheap natural-ish picture: smooth colour field plus noise (compresses like a photo, ~10-20 KB)."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def write_raw_pool(folder: Path, n: int, per_shard: int, seed: int = 0) -> dict[str, str]:
    """Raw shards per docs/formats.md; returns key -> raw shard name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keep: dict[str, str] = {}
    for start in range(0, n, per_shard):
        name = f"raw-{start // per_shard:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                key = f"{i:09d}"
                image = scene(rng)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                jpg = buf.getvalue()
                caption = f"a picture number {i}".encode()
                meta = json.dumps({"key": key, "url": f"http://127.0.0.1/{key}.jpg", "caption": caption.decode(),
                                   "query": "picture", "source": "bench", "width": image.width,
                                   "height": image.height, "sha256": hashlib.sha256(jpg).hexdigest(),
                                   "phash": phash_hex(image)}).encode()
                for ext, data in (("jpg", jpg), ("txt", caption), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keep[key] = name
    return keep


def run_webdataset(order: list[str], index: RawIndex, out: Path, per_shard: int) -> int:
    """wds.ShardWriter over the same samples; returns bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    fds = [os.open(p, os.O_RDONLY) for p in index.paths]
    try:
        with wds.ShardWriter(str(out / "shard-%05d.tar"), maxcount=per_shard, maxsize=3e9, verbose=0) as sink:
            for key in order:
                location = index.samples[key]
                sample = {"__key__": key}
                for ext, member in location.members:
                    sample[ext] = os.pread(fds[location.raw_shard], member.size, member.offset)
                sink.write(sample)
    finally:
        for fd in fds:
            os.close(fd)
    return sum(p.stat().st_size for p in out.glob("*.tar"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each writer; the best is reported")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        keep = write_raw_pool(root / "raw", args.n, 1000)
        print(f"raw pool: {args.n} samples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        raw_paths = {p.name: p for p in (root / "raw").glob("raw-*.tar")}
        index = index_raw_members(raw_paths, keep)
        order = shuffled_keys(list(keep), seed=0)
        plans = plan_shards(order, index, args.per_shard, 256 * 1024 * 1024)

        ours_s, wds_s, ours_cpu, wds_cpu = [], [], [], []
        ours_bytes = wds_bytes = 0
        for run in range(args.repeat):
            # Alternate the order so neither writer always runs with a warmer page cache.
            for which in (("ours", "wds") if run % 2 == 0 else ("wds", "ours")):
                out = root / f"{which}-{run}"
                start, cpu_start = time.perf_counter(), time.process_time()
                if which == "ours":
                    shards = write_shards(plans, index, lambda name, out=out: out / name, workers=2)
                    ours_s.append(time.perf_counter() - start)
                    ours_cpu.append(time.process_time() - cpu_start)
                    ours_bytes = sum(s.bytes for s in shards)
                else:
                    wds_bytes = run_webdataset(order, index, out, args.per_shard)
                    wds_s.append(time.perf_counter() - start)
                    wds_cpu.append(time.process_time() - cpu_start)
        ours_mb_s = ours_bytes / 1e6 / min(ours_s)
        wds_mb_s = wds_bytes / 1e6 / min(wds_s)
        result = {
            "samples": args.n, "shards": len(plans), "ours_bytes": ours_bytes, "wds_bytes": wds_bytes,
            "ours_seconds": [round(s, 3) for s in ours_s], "wds_seconds": [round(s, 3) for s in wds_s],
            "ours_mb_per_s": round(ours_mb_s, 1), "wds_shardwriter_mb_per_s": round(wds_mb_s, 1),
            "ratio_ours_over_wds": round(ours_mb_s / wds_mb_s, 2),
            "ours_cpu_seconds": [round(s, 3) for s in ours_cpu], "wds_cpu_seconds": [round(s, 3) for s in wds_cpu],
            "ours_mb_per_cpu_s": round(ours_bytes / 1e6 / min(ours_cpu), 1),
            "wds_mb_per_cpu_s": round(wds_bytes / 1e6 / min(wds_cpu), 1),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
