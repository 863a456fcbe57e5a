"""Export benchmark: the bundle's ONNX encoders in onnxruntime vs the PyTorch model in eager mode, same run.

For each model config (random weights, seed 0: speed does not depend on the values) both towers are exported once
with clip.export.onnx_export (what the export stage writes into the bundle) and timed against `CLIP.encode_image` /
`CLIP.encode_text` (float32, no_grad, eager, its text padding trimming on, as evaluation runs it): images/s and
texts/s at batch 1 and 32. Images are random [B, 3, S, S] tensors (preprocessing is the same for both and not
timed); texts are real captions of varied length tokenized to the full context (each runtime trims the padding
its own way). Each measurement runs in its own child process, as a deployment would: in one process the two
runtimes' thread pools fight (onnxruntime's workers spin-wait between runs; on 2 cores that starved eager
tiny-vit at batch 1 to 6 images/s instead of 430). onnxruntime: CPU provider, default session options; torch:
default threads (= cores). Rounds alternate which runtime goes first; the median round is reported.

    .venv/bin/python benchmarks/export.py                          # tiny-vit and ViT-B-32
    .venv/bin/python benchmarks/export.py --models tiny-vit --seconds 1 --json .bench/export.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from clip.export.onnx_export import export_image_encoder, export_text_encoder
from clip.model import CLIP, create_model
from clip.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = ("onnxruntime", "torch eager")
PADDED = "onnxruntime padded"  # --padded: the text graph without packing (export_text_encoder(packed=False))
CAPTIONS = [
    "a photo of a dog", "a red circle on a white background", "two people walking along the beach at sunset",
    "a close-up photo of a cat sleeping on a blue sofa", "an aerial view of a city at night", "a green triangle",
    "a bowl of fruit with apples, oranges and a banana on a wooden kitchen table", "the number 7",
]


def build(name: str) -> tuple[CLIP, Tokenizer]:
    """The same model and tokenizer in every process (deterministic tokenizer training, seeded weights)."""
    tokenizer = Tokenizer.train(CAPTIONS * 10, vocab_size=600)
    torch.manual_seed(0)
    return create_model(name, vocab_size=tokenizer.vocab_size).eval(), tokenizer


def rate(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Items per second of `fn` (one call = `batch` items) over at least `seconds` (and 3 calls)."""
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def child(name: str, runtime: str, onnx_dir: Path, batches: list[int], seconds: float) -> dict[str, float]:
    """One runtime's rates, `{"image/1": ..., "text/32": ...}`, measured in this process alone."""
    model, tokenizer = build(name)
    if runtime == "onnxruntime":
        image = ort.InferenceSession(str(onnx_dir / "image.onnx"), providers=["CPUExecutionProvider"])
        text = ort.InferenceSession(str(onnx_dir / "text.onnx"), providers=["CPUExecutionProvider"])
    elif runtime == PADDED:
        text = ort.InferenceSession(str(onnx_dir / "text_padded.onnx"), providers=["CPUExecutionProvider"])
    rates = {}
    with torch.no_grad():
        for batch in batches:
            images = torch.randn(batch, 3, model.image_size, model.image_size,
                                 generator=torch.Generator().manual_seed(batch))
            tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]).long()
            if runtime == PADDED:
                rates[f"text/{batch}"] = rate(lambda x=tokens.numpy(): text.run(["embedding"], {"text": x}),
                                              batch, seconds)
            elif runtime == "onnxruntime":
                images_np, tokens_np = images.numpy(), tokens.numpy()
                rates[f"image/{batch}"] = rate(lambda x=images_np: image.run(["embedding"], {"image": x}),
                                               batch, seconds)
                rates[f"text/{batch}"] = rate(lambda x=tokens_np: text.run(["embedding"], {"text": x}),
                                              batch, seconds)
            else:
                rates[f"image/{batch}"] = rate(lambda x=images: model.encode_image(x), batch, seconds)
                rates[f"text/{batch}"] = rate(lambda x=tokens: model.encode_text(x), batch, seconds)
    return rates


def bench_model(name: str, batches: list[int], seconds: float, rounds: int,
                padded: bool = False) -> list[dict[str, object]]:
    model, _ = build(name)
    runtimes = (*RUNTIMES, PADDED) if padded else RUNTIMES
    results: dict[str, dict[str, list[float]]] = {runtime: {} for runtime in runtimes}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(tmp)
        (onnx_dir / "image.onnx").write_bytes(export_image_encoder(model))
        (onnx_dir / "text.onnx").write_bytes(export_text_encoder(model))
        if padded:
            (onnx_dir / "text_padded.onnx").write_bytes(export_text_encoder(model, packed=False))
        for round_index in range(rounds):
            order = runtimes if round_index % 2 == 0 else runtimes[::-1]
            for runtime in order:
                command = [sys.executable, __file__, "--child", runtime, "--models", name, "--onnx-dir", tmp,
                           "--seconds", str(seconds), "--batches", *map(str, batches)]
                out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
                for key, value in json.loads(out.strip().splitlines()[-1]).items():
                    results[runtime].setdefault(key, []).append(value)
    return [{"model": name, "tower": key.split("/")[0], "batch": int(key.split("/")[1]), "runtime": runtime,
             "per_s": round(statistics.median(values), 1)}
            for runtime, by_key in results.items() for key, values in by_key.items()]


def cpu_name() -> str:
    """The CPU model and its widest vector unit: the ratio depends on it (MKL behind torch, MLAS behind
    onnxruntime)."""
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    name = value.strip()
                elif key.strip() == "model name":
                    name = f"{name} {value.strip()}"
                elif key.strip() == "flags":
                    flags = "avx512f" if "avx512f" in value.split() else "avx2" if "avx2" in value.split() else ""
                    break
    except OSError:
        pass
    return f"{name} ({flags})" if flags else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-vit", "ViT-B-32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--padded", action="store_true",
                        help="also time the text graph without packing (what packing gains, same onnxruntime)")
    parser.add_argument("--child", choices=(*RUNTIMES, PADDED), help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.models[0], args.child, Path(args.onnx_dir), args.batches, args.seconds)))
        return
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__}")
    rows = [row for name in args.models
            for row in bench_model(name, args.batches, args.seconds, args.rounds, args.padded)]

    def same(row: dict[str, object], runtime: str) -> dict[str, object] | None:
        return next((r for r in rows if r["runtime"] == runtime and
                     all(r[k] == row[k] for k in ("model", "tower", "batch"))), None)

    print("| model | tower | batch | onnxruntime /s | torch eager /s | onnxruntime / eager |"
          + (" padded graph /s | packed / padded |" if args.padded else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.padded else ""))
    for row in rows:
        if row["runtime"] != "onnxruntime":
            continue
        eager, padded = same(row, "torch eager"), same(row, PADDED)
        line = (f"| {row['model']} | {row['tower']} | {row['batch']} | {row['per_s']} | {eager['per_s']} | "
                f"{row['per_s'] / eager['per_s']:.2f}x |")  # type: ignore[index,operator]
        if args.padded:
            line += (f" {padded['per_s']} | {row['per_s'] / padded['per_s']:.2f}x |"  # type: ignore[operator]
                     if padded else " | |")
        print(line)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
