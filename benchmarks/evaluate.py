"""Evaluation benchmark: does the loader keep up with the encoder, how long is the probe's C search, and how do
our zero-shot numbers and times compare with CLIP_benchmark's on the same model and data.

1. **Loader vs encoder.** JPEG files on disk (`--images`, `--image-px` square, random scenes) are evaluated through
   clip.eval.features.extract (threaded decode + preprocess ahead of the encoder) and compared with the encoder's
   own forward throughput on pre-decoded float32 batches of the same size. Target: >= 90%.
2. **Probe search.** clip.eval.probe.linear_probe on `--probe-n` x `--probe-dim` Gaussian-class features (10
   classes; train 80% with its deterministic val split, test 20%), `--probe-workers` fits at once (default: one
   per CPU of the affinity mask), each limited to one BLAS thread. Target: seconds for 10,000 x 512. Then the
   few-shot curve on the same features (`--few-shot` k values x `--few-shot-seeds` draws). The load average is
   recorded before and after: on a shared box the figure means little without it.
3. **CLIP_benchmark side by side.** `--cb-images` synthetic-colors images (8 classes, `--cb-image-px`, WEBP) are
   written in CLIP_benchmark's webdataset layout (`--workers` equal shards, samples in a seeded random order,
   classnames.txt, the synthetic sets' 6 templates). Ours: clip.evalsets.webdataset + clip.eval.features.extract +
   clip.eval.zeroshot on a CheckpointEncoder. Theirs: benchmarks/clip_benchmark_peer.py in a subprocess with
   `--clip-benchmark-path` on PYTHONPATH (its build_dataset("wds/..."), a DataLoader with `--workers` processes,
   zeroshot_classification.evaluate) on open_clip's twin of the same weights. Both are timed from the data folder
   to the metrics (model loading excluded), median of `--rounds`; reported: top-1 of each, the number of images
   whose predictions differ, the largest cosine difference, the time ratio. CLIP_benchmark is not a dependency:
   `pip install --no-deps --target .bench/clip_benchmark clip-benchmark==1.6.2` (never into .venv).

    .venv/bin/python benchmarks/evaluate.py                               # tiny-vit, torch checkpoint path
    .venv/bin/python benchmarks/evaluate.py --model ViT-B-32 --images 512 --json .bench/evaluate.json
    .venv/bin/python benchmarks/evaluate.py --only clip_benchmark --checkpoint models/runs/<run>/final.pt
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip.eval import fewshot, probe
from clip.eval.encoders import CheckpointEncoder
from clip.eval.features import extract
from clip.eval.synthetic_sets import SYNTHETIC_TEMPLATES
from clip.eval.zeroshot import zeroshot_scores
from clip.evalsets.base import image_list
from clip.evalsets.webdataset import load_webdataset
from clip.formats.checkpoint import checkpoint_bytes
from clip.formats.tar import DeterministicTarWriter
from clip.model import create_model
from clip.synthetic import eval_classnames, generate_eval_set
from clip.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("loader", "probe", "clip_benchmark")

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


def probe_search(n: int, dim: int, workers: int | None, shots: list[int], seeds: int) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    labels = np.arange(n) % 10
    features = (centres[labels] + 4.0 * rng.normal(size=(n, dim))).astype(np.float32)
    cut = int(n * 0.8)
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    result = probe.linear_probe(features[:cut], labels[:cut], features[cut:], labels[cut:], num_classes=10,
                                workers=workers)
    report = {"n": n, "dim": dim, "cpus": probe.available_cpus(), "workers": probe.fit_workers(workers),
              "seconds": round(time.perf_counter() - start, 2), "fits": result.fits, "chosen_C": result.c,
              "cpu_seconds": round(time.process_time() - cpu_start, 2),  # all threads: BLAS spinning shows here
              "test_accuracy": round(result.value, 4)}
    if shots:
        start = time.perf_counter()
        points = fewshot.few_shot_curve(features[:cut], labels[:cut], features[cut:], labels[cut:], num_classes=10,
                                        shots=shots, seeds=list(range(seeds)), workers=workers)
        report["few_shot_seconds"] = round(time.perf_counter() - start, 2)
        report["few_shot"] = {p.shots: [round(p.mean, 4), round(p.spread, 4)] for p in points}
    report["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return report


def write_webdataset(folder: Path, n: int, px: int, shards: int, seed: int = 0) -> list[str]:
    """`n` synthetic-colors images in CLIP_benchmark's webdataset layout (test split, `shards` equal tars),
    samples in a seeded random order so that a mis-ordered comparison shows in the labels."""
    classes = list(eval_classnames("synthetic-colors"))
    samples = generate_eval_set("synthetic-colors", seed=seed, n=n, image_size=px)
    order = np.random.default_rng(seed).permutation(n)
    (folder / "test").mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("\n".join(classes) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in SYNTHETIC_TEMPLATES) + "\n")
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    per_shard = -(-n // shards)
    for shard in range(shards):
        with open(folder / "test" / f"{shard}.tar", "wb") as f:
            writer = DeterministicTarWriter(f)
            for position in order[shard * per_shard:(shard + 1) * per_shard]:
                image, label = samples[position]
                buffer = io.BytesIO()
                image.save(buffer, format="WEBP", quality=90)
                writer.add_sample(f"s{position:06d}", {"webp": buffer.getvalue(),
                                                       "cls": str(classes.index(label)).encode()})
            writer.close()
    return classes


def dataloader_order(shard_sizes: list[int], batch: int, workers: int) -> list[int]:
    """Positions (shard-major, as our loader lists them) in the order a torch DataLoader over a batched
    WebDataset yields them: worker w reads shards w, w + W, ...; batches come round-robin from the workers that
    still have data. Checked against the labels by the caller."""
    starts = np.cumsum([0, *shard_sizes])
    streams = []
    for w in range(max(1, workers)):
        positions = [p for s in range(w, len(shard_sizes), max(1, workers)) for p in range(starts[s], starts[s + 1])]
        streams.append([positions[i:i + batch] for i in range(0, len(positions), batch)])
    order: list[int] = []
    for round_ in range(max((len(s) for s in streams), default=0)):
        for stream in streams:
            if round_ < len(stream):
                order.extend(stream[round_])
    return order


def seeded_checkpoint(model_name: str, folder: Path) -> Path:
    """A checkpoint of `model_name` with seeded random weights and a tokenizer learnt from the class prompts."""
    torch.manual_seed(0)
    prompts = [t.format(c) for c in eval_classnames("synthetic-colors") for t in SYNTHETIC_TEMPLATES]
    tokenizer = Tokenizer.train(prompts * 20, vocab_size=600, min_frequency=1)
    model = create_model(model_name, vocab_size=tokenizer.vocab_size)
    path = folder / "seeded.pt"
    path.write_bytes(checkpoint_bytes({"model": model.state_dict(), "model_config": model.config.to_dict(),
                                       "tokenizer": tokenizer.to_json()}))
    return path


def versus_clip_benchmark(args) -> dict:
    """Our zero-shot evaluation and CLIP_benchmark's on the same checkpoint and the same webdataset folder."""
    peer_path = Path(args.clip_benchmark_path).resolve()
    if not (peer_path / "clip_benchmark" / "metrics" / "zeroshot_classification.py").exists():
        return {"skipped": f"clip_benchmark not found in {peer_path} (pip install --no-deps --target "
                           f"{args.clip_benchmark_path} clip-benchmark==1.6.2)"}
    folder = Path(tempfile.mkdtemp(prefix="eval-vs-cb-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else seeded_checkpoint(args.model, folder)
    encoder = CheckpointEncoder.load(str(checkpoint))
    shards = max(1, args.workers)
    classes = write_webdataset(folder / "data", args.cb_images, args.cb_image_px, shards)
    ours_seconds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        evalset = load_webdataset(folder / "data", "test")
        extracted = extract(encoder, evalset, batch_size=args.batch, workers=args.workers)
        ours = zeroshot_scores(encoder, extracted.embeddings, extracted.labels, evalset.classes, evalset.templates)
        ours_seconds.append(time.perf_counter() - start)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(peer_path), str(REPO)]))
    out = folder / "peer.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "clip_benchmark_peer.py"), "--checkpoint",
                    str(checkpoint), "--data", str(folder / "data"), "--batch", str(args.batch), "--workers",
                    str(args.workers), "--rounds", str(args.rounds), "--out", str(out)],
                   check=True, env=env, cwd=REPO, stderr=subprocess.DEVNULL if not args.verbose else None)
    peer = json.loads(out.read_text())
    shard_sizes = [0] * shards
    for sample_id in evalset.ids:
        shard_sizes[int(Path(sample_id.split("#")[0]).stem)] += 1
    order = dataloader_order(shard_sizes, args.batch, args.workers)
    our_labels = np.asarray(extracted.labels)[order]
    theirs_logits = np.asarray(peer["logits"], dtype=np.float32)
    if not np.array_equal(our_labels, np.asarray(peer["targets"])):
        raise RuntimeError("CLIP_benchmark's samples came in an order the comparison did not expect")
    our_cos = ours.logits[order] / encoder.logit_scale
    differing = int((ours.predictions[order] != theirs_logits.argmax(axis=1)).sum())
    ours_s, theirs_s = float(np.median(ours_seconds)), float(np.median(peer["seconds"]))
    return {"model": f"checkpoint {checkpoint}" if args.checkpoint else f"{args.model}, seeded random weights",
            "images": len(evalset), "image_px": args.cb_image_px, "classes": len(classes),
            "templates": len(SYNTHETIC_TEMPLATES), "batch": args.batch, "workers": args.workers,
            "rounds": args.rounds, "clip_benchmark_version": peer["clip_benchmark_version"],
            "ours": {"top1": round(ours.extra["top1"], 4), "seconds_median": round(ours_s, 2),
                     "seconds": [round(s, 2) for s in ours_seconds]},
            "clip_benchmark": {"top1": round(peer["metrics"]["acc1"], 4), "seconds_median": round(theirs_s, 2),
                               "seconds": [round(s, 2) for s in peer["seconds"]]},
            "differing_predictions": differing,
            "max_abs_cosine_difference": float(np.abs(our_cos - theirs_logits / 100.0).max()),
            "clip_benchmark_seconds_over_ours": round(theirs_s / ours_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--probe-n", type=int, default=10_000)
    parser.add_argument("--probe-dim", type=int, default=512)
    parser.add_argument("--probe-workers", type=int, default=None, help="fits at once (default: one per CPU)")
    parser.add_argument("--few-shot", default="1,2,4,8,16", help="k values of the few-shot curve ('': none)")
    parser.add_argument("--few-shot-seeds", type=int, default=3, help="draws per k")
    parser.add_argument("--checkpoint", default=None,
                        help="CLIP_benchmark comparison: a checkpoint (e.g. from `make pipeline`); default: --model "
                             "with seeded random weights")
    parser.add_argument("--cb-images", type=int, default=1000, help="CLIP_benchmark comparison: images")
    parser.add_argument("--cb-image-px", type=int, default=96, help="CLIP_benchmark comparison: image size")
    parser.add_argument("--rounds", type=int, default=3, help="CLIP_benchmark comparison: timed rounds (median)")
    parser.add_argument("--clip-benchmark-path", default=".bench/clip_benchmark",
                        help="folder holding the clip_benchmark package (pip install --no-deps --target ...)")
    parser.add_argument("--verbose", action="store_true", help="show the CLIP_benchmark subprocess's stderr")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    only = set(args.only.split(","))
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "torch_threads": torch.get_num_threads()}
    if "loader" in only:
        report["loader_vs_encoder"] = loader_vs_encoder(args.model, args.images, args.image_px, args.batch,
                                                        args.workers)[0]
        print(json.dumps({"loader_vs_encoder": report["loader_vs_encoder"]}))
    if "probe" in only:
        report["probe_search"] = probe_search(args.probe_n, args.probe_dim, args.probe_workers,
                                              [int(k) for k in args.few_shot.split(",") if k], args.few_shot_seeds)
        print(json.dumps({"probe_search": report["probe_search"]}))
    if "clip_benchmark" in only:
        report["clip_benchmark"] = versus_clip_benchmark(args)
        print(json.dumps({"clip_benchmark": report["clip_benchmark"]}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
