"""Training input pipeline benchmark: real JPEG shards -> the training loader -> (optionally) the training step.

    # CPU dev box: loader alone (decode + train transform + tokenize), images/s per DataLoader worker
    .venv/bin/python benchmarks/train_e2e.py loader --workers 1 2

    # end to end vs. synthetic data (same step, batches already in memory): samples/s and data-wait fraction
    .venv/bin/python benchmarks/train_e2e.py e2e --model tiny-vit --image-size 64 --batch-size 64 --workers 2

    # GPU target (ViT-B-32, bf16): end-to-end throughput >= 90% of the synthetic-data step throughput
    python benchmarks/train_e2e.py e2e --model ViT-B-32 --image-size 224 --batch-size 256 --workers 8 \\
        --device cuda --samples 20000 --source-size 320 --steps 100

Shards: `--samples` JPEGs of `--source-size` px (textured scenes, quality 90, ~the size of web images after
collection) written once under .bench/train_e2e/ with a manifest. The loader is clip.train.loader.RankLoader,
exactly what training uses (deterministic streams, window shuffle, per-sample seeded augmentation).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip.train.loader import RankLoader, StreamConfig  # noqa: E402
from clip.train.streams import DataState, StreamPlan, iter_captions, read_manifest  # noqa: E402

WORDS = ["red", "green", "blue", "small", "large", "square", "circle", "cat", "dog", "tree", "car", "house"]


def make_shards(folder: Path, samples: int, size: int, per_shard: int = 500, seed: int = 0) -> None:
    """Textured JPEGs (noise + gradients, so they do not compress to nothing) with short captions."""
    from PIL import Image

    if (folder / "manifest.json").exists():
        doc = json.loads((folder / "manifest.json").read_text())
        if doc["total_samples"] == samples and doc.get("bench_size") == size:
            return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    yy, xx = np.mgrid[0:size, 0:size]
    for start in range(0, samples, per_shard):
        name = f"shard-{start // per_shard:05d}.tar"
        count = min(per_shard, samples - start)
        with tarfile.open(folder / name, "w") as tar:
            for i in range(start, start + count):
                base = (np.sin(xx / rng.uniform(5, 40)) + np.cos(yy / rng.uniform(5, 40)))[..., None]
                pixels = (base * 60 + rng.integers(0, 255, 3) * 0.5 + rng.normal(0, 20, (size, size, 3)))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, 5))
                for ext, data in (("jpg", jpg.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = (folder / name).read_bytes()
        shards.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    version = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({
        "format": "clip-pipeline/shards/v1", "data_version": version, "total_samples": samples,
        "shards": shards, "bench_size": size}))


def build_loader(folder: Path, tokenizer_json: str, batch_size: int, workers: int, image_size: int,
                 device: str, steps: int) -> RankLoader:
    manifest = read_manifest(str(folder))
    streams = max(1, workers)
    chunk = batch_size // streams
    total = sum(s.samples for s in manifest.shards)
    steps_per_epoch = (total // streams) // chunk
    epochs = -(-steps // steps_per_epoch)
    cfg = StreamConfig(
        plan=StreamPlan(manifest.shards, streams, seed=0), chunk=chunk, steps_per_epoch=steps_per_epoch,
        epochs=epochs, shuffle_buffer=1000, image_size=image_size, tokenizer_json=tokenizer_json,
        rank_streams=tuple(range(streams)), start=DataState(positions=[0] * streams),
    )
    return RankLoader(cfg, workers, pin_memory=device == "cuda")


def tokenizer_for(folder: Path, vocab: int = 1000) -> str:
    from clip.tokenizer import Tokenizer

    return Tokenizer.train(iter_captions(read_manifest(str(folder))), vocab).to_json()


def bench_loader(args: argparse.Namespace, folder: Path, tok: str) -> None:
    for workers in args.workers:
        loader = build_loader(folder, tok, args.batch_size, workers, args.image_size, "cpu", args.steps + 2)
        it = iter(loader)
        next(it)  # worker start-up and first batch are not counted
        start, images = time.perf_counter(), 0
        for _ in range(args.steps):
            images += len(next(it).keys)
        elapsed = time.perf_counter() - start
        rate = images / elapsed
        print(json.dumps({"mode": "loader", "workers": workers, "images_per_s": round(rate, 1),
                          "images_per_s_per_worker": round(rate / max(1, workers), 1),
                          "image_size": args.image_size, "source_size": args.source_size}), flush=True)
        del it, loader


def bench_e2e(args: argparse.Namespace, folder: Path, tok: str) -> None:
    from clip.loss import ClipLoss
    from clip.model import create_model
    from clip.optim import build_optimizer
    from clip.tokenizer import Tokenizer

    device = torch.device(args.device)
    tokenizer = Tokenizer.from_json(tok)
    model = create_model(args.model, vocab_size=tokenizer.vocab_size, image_size=args.image_size).to(device)
    optimizer = build_optimizer(model, lr=1e-4)
    loss_fn = ClipLoss()
    bf16 = device.type == "cuda"

    def step(images: torch.Tensor, tokens: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images, tokens)
            loss = loss_fn(out.image_features.float(), out.text_features.float(), out.logit_scale.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # synthetic: one batch from the loader, reused (no input cost at all)
    loader = build_loader(folder, tok, args.batch_size, args.workers[0], args.image_size, args.device, 2 * args.steps + 4)
    it = iter(loader)
    first = next(it)
    images, tokens = first.images.to(device), first.tokens.to(device)
    for _ in range(3):
        step(images, tokens)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, tokens)
    sync()
    synthetic = args.steps * args.batch_size / (time.perf_counter() - start)
    # end to end: the loader feeds every step
    wait = 0.0
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        step(batch.images.to(device, non_blocking=True), batch.tokens.to(device, non_blocking=True))
    sync()
    elapsed = time.perf_counter() - start
    e2e = args.steps * args.batch_size / elapsed
    print(json.dumps({"mode": "e2e", "model": args.model, "device": args.device, "workers": args.workers[0],
                      "batch_size": args.batch_size, "image_size": args.image_size,
                      "synthetic_samples_per_s": round(synthetic, 1), "e2e_samples_per_s": round(e2e, 1),
                      "e2e_over_synthetic": round(e2e / synthetic, 3),
                      "data_wait_fraction": round(wait / elapsed, 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["loader", "e2e"])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    folder = ROOT / ".bench" / "train_e2e" / f"shards-{args.samples}-{args.source_size}"
    make_shards(folder, args.samples, args.source_size)
    tok = tokenizer_for(folder)
    if args.mode == "loader":
        bench_loader(args, folder, tok)
    else:
        bench_e2e(args, folder, tok)


if __name__ == "__main__":
    main()
