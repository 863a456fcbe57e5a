"""The cost of feature-cache accumulation (`train.accum_steps`): one training step (clip.train.step.train_step) of
a global batch of k x m in k micro-batches of m, against the same step in one piece, same process, same weights,
alternating rounds.

    .venv/bin/python benchmarks/train_accum.py                                   # CPU: tiny-vit, 4 x 32
    .venv/bin/python benchmarks/train_accum.py --config ViT-B-32 --micro-batch 512 --accum-steps 64 \
        --baseline micro --precision bf16                                        # GPU: 32,768 by accumulation

Reports the median step time (wall, and on the CPU process CPU time, steadier when other jobs share the box) of
each variant over `--steps` timed steps (after `--warmup`), samples/s and the
overhead ratio accumulated / one piece (the recomputation costs about one extra forward: ideally ~1.33 at most).
`--baseline micro` compares with one step of a single micro-batch instead (samples/s only), for a global batch
too large to run in one piece. Peak memory: CUDA max allocated per variant; on the CPU (`--memory`) the max RSS of
one subprocess per variant. Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.train_step import sync, synthetic_tokens  # noqa: E402
from clip.loss import ClipLoss  # noqa: E402
from clip.model import create_model, get_config, list_models  # noqa: E402
from clip.optim import build_optimizer  # noqa: E402
from clip.train.distributed import DistInfo  # noqa: E402
from clip.train.state import TrainState  # noqa: E402
from clip.train.step import mark_tokens_checked, train_step  # noqa: E402
from clip.train.wrap import wrap_model  # noqa: E402

VARIANTS = ("one_piece", "accumulated")


class Variant:
    """One model + AdamW + schedule stepping batches of `batch_size` rows in `accum_steps` micro-batches."""

    def __init__(self, label: str, config: str, batch_size: int, accum_steps: int, device: torch.device,
                 seed: int) -> None:
        torch.manual_seed(seed)  # the same weights for every variant
        self.label, self.batch_size, self.accum_steps, self.device = label, batch_size, accum_steps, device
        info = DistInfo(device=device)
        self.info = info
        wrapped = wrap_model(create_model(config), info)
        mark_tokens_checked(wrapped)
        optimizer = build_optimizer(wrapped.module, lr=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.state = TrainState(wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, tokenizer=None,  # type: ignore[arg-type]
                                model_config={}, train_config={}, data_version="", start_step=0,
                                data_state=None)  # type: ignore[arg-type]
        self.loss_fn = ClipLoss(equal_batches=True)
        self.times: list[float] = []  # wall seconds per timed step
        self.cpu_times: list[float] = []  # process CPU seconds per timed step: steadier on a shared CPU box
        self.peak_bytes = 0

    def step(self, images: torch.Tensor, tokens: torch.Tensor, use_bf16: bool) -> None:
        train_step(self.state, self.loss_fn, images[: self.batch_size], tokens[: self.batch_size], self.info,
                   use_bf16=use_bf16, accum_steps=self.accum_steps)

    def timed(self, images: torch.Tensor, tokens: torch.Tensor, use_bf16: bool) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # this variant's step (both models stay resident)
        began, began_cpu = time.perf_counter(), time.process_time()
        self.step(images, tokens, use_bf16)
        sync(self.device)
        self.times.append(time.perf_counter() - began)
        self.cpu_times.append(time.process_time() - began_cpu)
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny-vit", choices=list_models())
    parser.add_argument("--micro-batch", type=int, default=32, help="rows per micro-batch (m)")
    parser.add_argument("--accum-steps", type=int, default=4, help="micro-batches per step (k)")
    parser.add_argument("--baseline", choices=["global", "micro"], default="global",
                        help="global: one step of k x m rows (same global batch); micro: one step of m rows")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--memory", action="store_true", help="CPU: max RSS of one subprocess per variant")
    parser.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # the --memory subprocesses
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("micro_batch", "accum_steps", "steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark: /proc's VmHWM (its own address space; ru_maxrss would also carry the
    high-water mark of the parent that forked it), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subprocess_rss_mb(argv: list[str], variant: str) -> float:
    """Max RSS (MB) of a fresh process that runs `variant` alone (same arguments, two timed steps)."""
    cmd = [sys.executable, __file__, *argv, "--only", variant, "--steps", "2", "--warmup", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout[done.stdout.index("{"):])["peak_rss_mb"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    use_bf16 = precision == "bf16"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = get_config(args.config)
    global_batch = args.micro_batch * args.accum_steps
    baseline_batch = global_batch if args.baseline == "global" else args.micro_batch
    specs = {"one_piece": (baseline_batch, 1), "accumulated": (global_batch, args.accum_steps)}
    labels = [args.only] if args.only else list(VARIANTS)
    variants = [Variant(label, args.config, *specs[label], device, args.seed) for label in labels]

    gen = torch.Generator().manual_seed(args.seed)
    size = cfg.vision.image_size
    images = torch.randn(global_batch, 3, size, size, generator=gen).to(device)
    tokens = synthetic_tokens(cfg, global_batch, False, args.seed).to(device)
    for variant in variants:
        for _ in range(args.warmup):
            variant.step(images, tokens, use_bf16)
    for round_index in range(args.steps):  # alternate who goes first
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            variant.timed(images, tokens, use_bf16)

    results: dict[str, Any] = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": precision, "micro_batch": args.micro_batch, "accum_steps": args.accum_steps,
        "global_batch": global_batch, "baseline": args.baseline, "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__,
    }
    for variant in variants:
        step_s = statistics.median(variant.times)
        entry: dict[str, Any] = {"batch": variant.batch_size, "accum_steps": variant.accum_steps,
                                 "step_ms": round(step_s * 1000, 2),
                                 "samples_per_s": round(variant.batch_size / step_s, 1)}
        if device.type == "cuda":
            entry["peak_memory_mb"] = round(variant.peak_bytes / 2**20, 1)
        else:
            entry["cpu_ms_per_step"] = round(statistics.median(variant.cpu_times) * 1000, 2)
        results[variant.label] = entry
    if args.only:
        results["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    elif args.memory and device.type == "cpu":
        for label in VARIANTS:
            results[label]["peak_rss_mb"] = _subprocess_rss_mb(argv, label)
    if not args.only:
        one, acc = results["one_piece"], results["accumulated"]
        results["throughput_ratio_accumulated_over_one_piece"] = round(
            acc["samples_per_s"] / one["samples_per_s"], 3)
        if args.baseline == "global":
            results["overhead_ratio_step_time"] = round(acc["step_ms"] / one["step_ms"], 3)
            if device.type == "cpu":  # the same ratio from CPU time, which other jobs on the box disturb less
                results["overhead_ratio_cpu_time"] = round(acc["cpu_ms_per_step"] / one["cpu_ms_per_step"], 3)
        print(f"{'variant':<12} {'batch':>7} {'k':>4} {'step ms':>10} {'cpu ms':>10} {'samples/s':>10} "
              f"{'peak MB':>9}")
        for label in VARIANTS:
            row = results[label]
            peak = row.get("peak_memory_mb", row.get("peak_rss_mb", float("nan")))
            print(f"{label:<12} {row['batch']:>7} {row['accum_steps']:>4} {row['step_ms']:>10.2f} "
                  f"{row.get('cpu_ms_per_step', float('nan')):>10.2f} {row['samples_per_s']:>10.1f} {peak:>9.1f}")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
