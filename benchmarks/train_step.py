"""Time one full CLIP training step (forward, contrastive loss, backward, AdamW) on synthetic batches.

    .venv/bin/python benchmarks/train_step.py --config tiny-vit --peer open_clip
    .venv/bin/python benchmarks/train_step.py --config ViT-B-32 --batch-size 512 --precision bf16 --peer open_clip

Prints one JSON object: samples/s, step time, TFLOP/s (FLOPs of one step counted once with
torch.utils.flop_counter.FlopCounterMode), peak memory (CUDA max allocated, or the process's max RSS on
CPU). With `--peer open_clip`, open_clip's equivalent model (same architecture, same weights copied in)
and its ClipLoss run on the same batches in the same process, alternating with ours in rounds, and the
ratio ours/peer of samples/s is reported.

Text inputs: captions from a small generator (colours, shapes, counts, places; 5-30 tokens), tokenised
by `clip.tokenizer.Tokenizer` trained on them (random ids of the same lengths if that module is missing).
`--full-context` makes every row 77 tokens long (no padding at all), the worst case for our encoder,
which only runs the text tower up to the batch's last end-of-text token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clip.model import CLIPConfig, create_model, get_config, list_models  # noqa: E402
from clip.optim import build_optimizer  # noqa: E402
from tests.support.openclip_twin import open_clip_from_config  # noqa: E402

# Our preset -> open_clip's name for the same architecture (QuickGELU variants: what OpenAI released).
OPEN_CLIP_NAMES = {
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "ViT-B-32": "ViT-B-32-quickgelu",
    "ViT-B-16": "ViT-B-16-quickgelu",
    "ViT-L-14": "ViT-L-14-quickgelu",
}

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "pink"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"]
COUNTS = ["one", "two", "three", "four", "a", "several"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "near the corner"]
SIZES = ["small", "large", "tiny", "huge", ""]


def synthetic_captions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        clauses = []
        for _ in range(rng.randint(1, 3)):
            words = [
                rng.choice(COUNTS),
                rng.choice(SIZES),
                rng.choice(COLOURS),
                rng.choice(SHAPES),
                rng.choice(PLACES),
            ]
            clauses.append(" ".join(w for w in words if w))
        captions.append(
            rng.choice(["a photo of ", "an image of ", "", "a drawing with "]) + " and ".join(clauses)
        )
    return captions


def synthetic_tokens(cfg: CLIPConfig, count: int, full_context: bool, seed: int) -> torch.Tensor:
    """[count, context_length] token ids whose end-of-text id is the highest id below vocab_size."""
    ctx, vocab = cfg.text.context_length, cfg.text.vocab_size
    gen = torch.Generator().manual_seed(seed)
    if full_context:
        tokens = torch.randint(1, vocab - 2, (count, ctx), generator=gen)
        tokens[:, 0], tokens[:, -1] = vocab - 2, vocab - 1
        return tokens
    captions = synthetic_captions(count, seed)
    try:
        from clip.tokenizer import Tokenizer

        tokenizer = Tokenizer.train(captions, vocab_size=min(vocab, 1024))
        tokens = tokenizer(captions, context_length=ctx)
    except ImportError:  # the tokenizer module is not there: random ids, caption-like lengths
        tokens = torch.zeros(count, ctx, dtype=torch.long)
        for row, caption in enumerate(captions):
            length = min(ctx, len(caption.split()) + 2)
            tokens[row, 1 : length - 1] = torch.randint(1, vocab - 2, (length - 2,), generator=gen)
            tokens[row, 0], tokens[row, length - 1] = vocab - 2, vocab - 1
    if int(tokens.max()) >= vocab:
        raise ValueError(f"tokenizer produced id {int(tokens.max())} >= vocab_size {vocab}")
    return tokens


def contrastive_loss() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """clip.loss.ClipLoss when present; else the symmetric cross-entropy written out."""
    try:
        from clip.loss import ClipLoss

        return ClipLoss()
    except ImportError:

        def symmetric_ce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            logits = scale * image @ text.T  # [N, N]
            labels = torch.arange(logits.shape[0], device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        return symmetric_ce


def build_peer(name: str, cfg: CLIPConfig) -> nn.Module:
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights are loaded
    if name in OPEN_CLIP_NAMES:
        return open_clip.create_model(OPEN_CLIP_NAMES[name], pretrained=None, output_dict=True)
    return open_clip_from_config(cfg, output_dict=True)


class Runner:
    """One model + loss + optimizer; `step(images, tokens)` is one full training step."""

    def __init__(
        self,
        label: str,
        model: nn.Module,
        loss_fn: Callable,
        device: torch.device,
        precision: str,
        compile_model: bool,
    ) -> None:
        self.label = label
        self.model = model.to(device).train()
        self.optimizer = build_optimizer(self.model, lr=1e-4)
        self.loss_fn = loss_fn
        self.device = device
        self.precision = precision
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # process CPU time: robust on a box shared with other jobs
        self.steps = 0
        self.peak_bytes = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.forward(images, tokens)
            if isinstance(out, dict):  # open_clip
                return self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            return self.loss_fn(out.image_features, out.text_features, out.logit_scale)

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        self.loss(images, tokens).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self, images: torch.Tensor, tokens: torch.Tensor) -> int:
        """FLOPs of forward + backward (the optimizer's elementwise work is not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            with self._autocast():
                out = self.model(images, tokens)
                if isinstance(out, dict):
                    loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
                else:
                    loss = self.loss_fn(out.image_features, out.text_features, out.logit_scale)
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_block(
    runner: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, start: int
) -> None:
    sync(runner.device)
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runner.device)
    began, began_cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        runner.step(*batches[(start + i) % len(batches)])
    sync(runner.device)
    runner.seconds += time.perf_counter() - began
    runner.cpu_seconds += time.process_time() - began_cpu
    runner.steps += steps
    if runner.device.type == "cuda":
        runner.peak_bytes = max(runner.peak_bytes, torch.cuda.max_memory_allocated(runner.device))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny-vit", choices=list_models())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument(
        "--rounds", type=int, default=4, help="timed steps are split in this many alternating blocks"
    )
    parser.add_argument("--peer", choices=["none", "open_clip"], default="none")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="ResNet activations in NHWC (auto: on for CUDA, off for CPU)",
    )
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--full-context", action="store_true", help="every caption 77 tokens (no padding)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    cfg = get_config(args.config)

    ours = create_model(args.config)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    ours.set_channels_last(channels_last)
    ours.set_grad_checkpointing(args.grad_checkpointing)
    runners = [Runner("ours", ours, contrastive_loss(), device, precision, args.compile)]
    if args.peer == "open_clip":
        from open_clip.loss import ClipLoss as PeerClipLoss

        peer = build_peer(args.config, cfg)
        peer.load_state_dict(ours.state_dict(), strict=True)  # same weights, same names
        if args.grad_checkpointing:
            peer.set_grad_checkpointing(True)
        runners.append(Runner("open_clip", peer, PeerClipLoss(), device, precision, args.compile))

    # A few distinct batches, shared by both models.
    image_size = cfg.vision.image_size
    gen = torch.Generator().manual_seed(args.seed)
    tokens = synthetic_tokens(cfg, 4 * args.batch_size, args.full_context, args.seed)
    batches = []
    for i in range(4):
        images = torch.randn(args.batch_size, 3, image_size, image_size, generator=gen)
        batches.append(
            (images.to(device), tokens[i * args.batch_size : (i + 1) * args.batch_size].to(device))
        )
    lengths = (tokens.argmax(-1) + 1).float()

    flops = {r.label: r.count_flops(*batches[0]) for r in runners}
    for runner in runners:
        if args.warmup:
            run_block(runner, batches, args.warmup, 0)
        runner.seconds, runner.cpu_seconds, runner.steps, runner.peak_bytes = 0.0, 0.0, 0, 0
    per_round = [
        args.steps // args.rounds + (1 if i < args.steps % args.rounds else 0) for i in range(args.rounds)
    ]
    for round_index, steps in enumerate(per_round):
        order = runners if round_index % 2 == 0 else runners[::-1]  # alternate who goes first
        for runner in order:
            if steps:
                run_block(runner, batches, steps, round_index)

    results: dict[str, Any] = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": precision,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "channels_last": channels_last,
        "grad_checkpointing": args.grad_checkpointing,
        "text_tokens": {"mean": round(lengths.mean().item(), 1), "max": int(lengths.max())},
        "torch": torch.__version__,
    }
    for runner in runners:
        step_s = runner.seconds / runner.steps
        entry = {
            "samples_per_s": round(args.batch_size / step_s, 1),
            "step_ms": round(step_s * 1000, 2),
            "flops_per_step": flops[runner.label],
            "tflops_per_s": round(flops[runner.label] / step_s / 1e12, 4),
            "params": sum(p.numel() for p in runner.model.parameters()),
        }
        if device.type == "cuda":
            entry["peak_memory_mb"] = round(runner.peak_bytes / 2**20, 1)
        else:
            entry["cpu_ms_per_step"] = round(runner.cpu_seconds / runner.steps * 1000, 2)
        results[runner.label] = entry
    if device.type == "cpu":  # max RSS covers the whole process (both models), in kB on Linux
        results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if len(runners) == 2:
        results["speed_ratio_ours_over_open_clip"] = round(
            results["ours"]["samples_per_s"] / results["open_clip"]["samples_per_s"], 3
        )
        if device.type == "cpu":  # the same ratio from CPU time, which other jobs on the box disturb less
            results["cpu_time_ratio_open_clip_over_ours"] = round(
                results["open_clip"]["cpu_ms_per_step"] / results["ours"]["cpu_ms_per_step"], 3
            )
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
