"""CLIP_benchmark's own zero-shot path on one of our checkpoints: the peer side of benchmarks/evaluate.py.

Run in a subprocess with CLIP_benchmark on PYTHONPATH (it is not a dependency of this project and stays out of
.venv; benchmarks/evaluate.py installs nothing, see its docstring):

    PYTHONPATH=.bench/clip_benchmark:. .venv/bin/python benchmarks/clip_benchmark_peer.py \
        --checkpoint final.pt --data DIR --batch 64 --workers 2 --rounds 3 --out peer.json

What runs is what `clip_benchmark eval --dataset wds/<name>` runs for zero-shot classification, without its CLI
and model loader: `clip_benchmark.datasets.builder.build_dataset("wds/...")` over the webdataset folder (its
WebDataset pipeline, PIL decoding), a torch DataLoader over `dataset.batched(batch)` with `num_workers` worker
processes (as its CLI builds it), and `clip_benchmark.metrics.zeroshot_classification.evaluate` (its classifier
from classnames.txt + templates, its classification loop and metrics). The model is open_clip's CLIP built by
tests/support/openclip_twin.py with exactly the checkpoint's weights; the image transform is open_clip's eval
transform, i.e. what CLIP_benchmark's open_clip loader returns; the tokenizer is the checkpoint's own (a model's
tokenizer is part of the model). amp is off: float32 on the CPU, as ours.

Two things are swapped in: a pass-through wrapper around `run_classification` that keeps the logits and targets
it returns, so the caller can compare per-image predictions (CLIP_benchmark's evaluate returns only the metrics);
and `numpy2_accuracy` for its top-k `accuracy` helper, which fails under NumPy >= 2.4 (see that function).
Each round is timed from building the dataset to the metrics (model construction excluded, as on our side).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="a CLIP_benchmark webdataset folder (test split)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc

    from clip.formats.checkpoint import parse_checkpoint
    from clip.model import create_model_from_config
    from clip.tokenizer import Tokenizer
    from tests.support.openclip_twin import open_clip_from_config

    logging.getLogger("root").setLevel(logging.ERROR)
    data = parse_checkpoint(Path(args.checkpoint).read_bytes(), args.checkpoint,
                            require=("model", "model_config", "tokenizer"))
    config = create_model_from_config(data["model_config"]).config
    model = open_clip_from_config(config)
    model.load_state_dict(data["model"], strict=True)
    model.eval()
    tokenizer = Tokenizer.from_json(data["tokenizer"])
    image_size = config.vision.image_size
    transform = open_clip.image_transform(image_size, is_train=False)

    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = zsc.run_classification

    def recording(*a, **k):
        logits, target = original(*a, **k)
        recorded.append((logits, target))
        return logits, target

    zsc.run_classification = recording
    zsc.accuracy = numpy2_accuracy
    rounds = []
    for _ in range(max(1, args.rounds)):
        recorded.clear()
        start = time.perf_counter()
        dataset = build_dataset("wds/bench", root=args.data, transform=transform, split="test", download=False)
        loader = torch.utils.data.DataLoader(dataset.batched(args.batch), batch_size=None, shuffle=False,
                                             num_workers=args.workers)
        metrics = zsc.evaluate(model, loader, lambda texts: tokenizer(texts, model.context_length),
                               dataset.classes, dataset.templates, device="cpu", amp=False)
        rounds.append(time.perf_counter() - start)
    logits, target = recorded[-1]
    Path(args.out).write_text(json.dumps({
        "metrics": metrics, "seconds": rounds, "torch_threads": torch.get_num_threads(),
        "clip_benchmark_version": _version(), "logits": logits.tolist(), "targets": target.tolist()}))


def numpy2_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Top-k accuracy as CLIP_benchmark 1.6.2's `accuracy` computes it (k highest logits contain the target).
    Its own version calls float() on a one-element numpy array, which NumPy >= 2.4 refuses (TypeError), so this
    stand-in is swapped in; everything else is CLIP_benchmark's code."""
    top = output.topk(max(topk), dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return [hit[:, :k].any(dim=1).float().sum().item() / len(target) for k in topk]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clip_benchmark")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
