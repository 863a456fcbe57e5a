"""Evaluation benchmark: does the loader keep up with the encoder, how long is the probe's C search, and how do
our zero-shot numbers and times compare with CLIP_benchmark's on the same model and data.

1. **Loader vs encoder.** JPEG files on disk (`--images`, `--image-px` square, random scenes) are evaluated through
   clip.eval.features.extract (threaded decode + preprocess ahead of the encoder) and compared with the encoder's
   own forward throughput on pre-decoded float32 batches of the same size. Target: >= 90%.
2. **Probe search.** clip.eval.probe.linear_probe on `--probe-n` x `--probe-dim` Gaussian-class features (10
   classes; train 80% with its deterministic val split, test 20%). Target: under a minute for 10,000 x 512.
3. **CLIP_benchmark** (when `clip_benchmark` is importable): its `zeroshot_classification.evaluate` on the same
   model, classes, templates and images, with accuracy and time beside ours.

    .venv/bin/python benchmarks/evaluate.py                               # tiny-vit, torch checkpoint path
    .venv/bin/python benchmarks/evaluate.py --model ViT-B-32 --images 512 --json .bench/evaluate.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip.eval import probe
from clip.eval.encoders import CheckpointEncoder
from clip.eval.features import extract
from clip.eval.zeroshot import zeroshot_scores
from clip.evalsets.base import image_list
from clip.model import create_model
from clip.tokenizer import Tokenizer

CLASSES = ["red", "green", "blue", "yellow", "purple"]
TEMPLATES = ["a photo of a {} thing.", "a {} object"]


def write_images(folder: Path, n: int, px: int) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        pixels = rng.integers(0, 255, size=(px // 8, px // 8, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).resize((px, px), Image.Resampling.BILINEAR).save(path, quality=90)
        items.append((path, i % len(CLASSES)))
    return items


def loader_vs_encoder(model_name: str, n: int, px: int, batch: int, workers: int) -> tuple[dict, object, object]:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train([f"a photo of a {c} thing" for c in CLASSES] * 20, vocab_size=600, min_frequency=1)
    model = create_model(model_name, vocab_size=tokenizer.vocab_size).eval()
    encoder = CheckpointEncoder(model, tokenizer, fingerprint="bench", name=model_name)
    folder = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    evalset = image_list("bench", "test", folder, list(CLASSES), write_images(folder, n, px), list(TEMPLATES))
    pixels = np.random.default_rng(1).normal(size=(batch, 3, encoder.image_size, encoder.image_size)).astype(np.float32)
    encoder.forward_pixels(pixels)  # warm-up
    start = time.perf_counter()
    for _ in range(max(1, n // batch)):
        encoder.forward_pixels(pixels)
    forward_rate = max(1, n // batch) * batch / (time.perf_counter() - start)
    extract(encoder, evalset, batch_size=batch, workers=workers)  # warm-up (file cache)
    extracted = extract(encoder, evalset, batch_size=batch, workers=workers)
    eval_rate = extracted.total / extracted.seconds
    return ({"model": model_name, "images": n, "image_px": px, "batch": batch, "workers": workers,
             "encoder_forward_images_per_s": round(forward_rate, 1), "evaluation_images_per_s": round(eval_rate, 1),
             "ratio": round(eval_rate / forward_rate, 3)}, encoder, evalset)


def probe_search(n: int, dim: int, workers: int) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    labels = np.arange(n) % 10
    features = (centres[labels] + 4.0 * rng.normal(size=(n, dim))).astype(np.float32)
    cut = int(n * 0.8)
    start = time.perf_counter()
    result = probe.linear_probe(features[:cut], labels[:cut], features[cut:], labels[cut:], num_classes=10,
                                workers=workers)
    return {"n": n, "dim": dim, "seconds": round(time.perf_counter() - start, 2), "fits": result.fits,
            "chosen_C": result.c, "test_accuracy": round(result.value, 4)}


def versus_clip_benchmark(encoder, evalset, batch: int) -> dict:
    try:
        from clip_benchmark.metrics import zeroshot_classification
    except ImportError:
        return {"skipped": "clip_benchmark is not installed (pip install clip-benchmark)"}
    start = time.perf_counter()
    ours = extract(encoder, evalset, batch_size=batch)
    our_result = zeroshot_scores(encoder, ours.embeddings, ours.labels, evalset.classes, evalset.templates)
    our_seconds = time.perf_counter() - start
    images = [(torch.from_numpy(encoder.preprocess([evalset.image(i)])[0]), evalset.labels[i])
              for i in range(len(evalset))]
    loader = torch.utils.data.DataLoader(images, batch_size=batch)
    start = time.perf_counter()
    theirs = zeroshot_classification.evaluate(
        encoder.model, loader, lambda texts: encoder.tokenizer(texts, encoder.model.context_length),
        list(evalset.classes), list(evalset.templates), device="cpu", amp=False)
    return {"ours": {"top1": our_result.extra["top1"], "seconds": round(our_seconds, 2)},
            "clip_benchmark": {"top1": theirs.get("acc1"), "seconds": round(time.perf_counter() - start, 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--probe-n", type=int, default=10_000)
    parser.add_argument("--probe-dim", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    loader, encoder, evalset = loader_vs_encoder(args.model, args.images, args.image_px, args.batch, args.workers)
    print(json.dumps({"loader_vs_encoder": loader}))
    searched = probe_search(args.probe_n, args.probe_dim, workers=min(4, os.cpu_count() or 1))
    print(json.dumps({"probe_search": searched}))
    compared = versus_clip_benchmark(encoder, evalset, args.batch)
    print(json.dumps({"clip_benchmark": compared}))
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": torch.get_num_threads(), "loader_vs_encoder": loader, "probe_search": searched,
              "clip_benchmark": compared}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
