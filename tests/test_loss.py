"""ClipLoss: single process against hand-built references; 2 and 4 real gloo processes against the
single-process computation on the concatenated batch (loss values, feature gradients, and parameter and
logit_scale gradients after DDP-style averaging)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip.loss import ClipLoss

IN_DIM, FEATURE_DIM, LOCAL_BATCH = 6, 4, 3


def _reference_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE written out row by row: -log softmax of the matching pair, both directions."""
    n = image.shape[0]
    similarity = scale * image @ text.T  # [n, n]
    image_to_text = torch.stack([torch.logsumexp(similarity[i], 0) - similarity[i, i] for i in range(n)]).mean()
    text_to_image = torch.stack([torch.logsumexp(similarity[:, j], 0) - similarity[j, j] for j in range(n)]).mean()
    return (image_to_text + text_to_image) / 2


def _problem(n: int) -> dict[str, torch.Tensor]:
    """Same tensors on every rank: raw inputs for the global batch, two linear 'encoders', log scale."""
    g = torch.Generator().manual_seed(1234 + n)
    return {
        "image_in": torch.randn(n, IN_DIM, generator=g, dtype=torch.float64),
        "text_in": torch.randn(n, IN_DIM, generator=g, dtype=torch.float64),
        "image_proj": torch.randn(IN_DIM, FEATURE_DIM, generator=g, dtype=torch.float64),
        "text_proj": torch.randn(IN_DIM, FEATURE_DIM, generator=g, dtype=torch.float64),
        "log_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64),
    }


def _forward_backward(problem: dict[str, torch.Tensor], rows: slice, loss_fn) -> dict[str, torch.Tensor]:
    """Encode the given rows, run the loss, backprop; returns the loss, feature and parameter grads."""
    params = {k: problem[k].clone().requires_grad_(True) for k in ("image_proj", "text_proj", "log_scale")}
    image = F.normalize(problem["image_in"][rows] @ params["image_proj"], dim=-1)
    text = F.normalize(problem["text_in"][rows] @ params["text_proj"], dim=-1)
    image.retain_grad()
    text.retain_grad()
    loss = loss_fn(image, text, params["log_scale"].exp())
    loss.backward()
    out = {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad}
    out.update({f"{k}_grad": p.grad for k, p in params.items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# single process


def test_matches_row_by_row_reference_and_known_value() -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    got = ClipLoss()(image, text, scale)
    torch.testing.assert_close(got, _reference_loss(image, text, scale))
    logits = scale * image @ text.T
    explicit = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(got, explicit)

    # Two orthogonal pairs, scale 1: logits = I, every row's loss is log(1 + e^-1).
    eye = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(ClipLoss()(eye, eye, torch.tensor(1.0, dtype=torch.float64)),
                               torch.tensor(math.log1p(math.exp(-1)), dtype=torch.float64))


def test_single_process_gradients_match_reference() -> None:
    problem = _problem(LOCAL_BATCH)
    rows = slice(None)
    got = _forward_backward(problem, rows, ClipLoss())
    want = _forward_backward(problem, rows, _reference_loss)
    for key in got:
        torch.testing.assert_close(got[key], want[key])


def test_label_cache_off_gives_same_value() -> None:
    image = F.normalize(torch.randn(4, 3), dim=-1)
    text = F.normalize(torch.randn(4, 3), dim=-1)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(ClipLoss(cache_labels=False)(image, text, scale), ClipLoss()(image, text, scale))


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ClipLoss()(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        ClipLoss()(torch.randn(4), torch.randn(4), torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------------------
# distributed: real gloo process groups

VARIANTS = [  # (local_loss, gather_with_grad)
    (False, True),
    (True, True),
    (False, False),
    (True, False),
]
UNEVEN_SIZES = [2, 3, 1, 4]  # rows per rank for the ragged-batch case


def _layouts(world_size: int) -> dict[str, list[int]]:
    return {"even": [LOCAL_BATCH] * world_size, "uneven": UNEVEN_SIZES[:world_size]}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        results = {}
        for layout, sizes in _layouts(world_size).items():
            problem = _problem(sum(sizes))
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            for local_loss, gather_with_grad in VARIANTS:
                loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
                out = _forward_backward(problem, rows, loss_fn)
                for key in ("image_proj_grad", "text_proj_grad", "log_scale_grad"):
                    dist.all_reduce(out[key])  # what DDP does to parameter gradients: sum, then / world size
                    out[key] /= world_size
                results[(layout, local_loss, gather_with_grad)] = out
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_matches_single_process(world_size: int, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]

    for layout, sizes in _layouts(world_size).items():
        want = _forward_backward(_problem(sum(sizes)), slice(None), _reference_loss)
        for local_loss, gather_with_grad in VARIANTS:
            variant = f"{layout} batches, local_loss={local_loss} gather_with_grad={gather_with_grad}"
            outs = [results[(layout, local_loss, gather_with_grad)] for results in per_rank]
            losses = torch.stack([o["loss"] for o in outs])
            # full matrix: every rank has the global loss; local loss: the mean over ranks is the global loss
            if local_loss:
                torch.testing.assert_close(losses.mean(), want["loss"], msg=variant)
            else:
                torch.testing.assert_close(losses, want["loss"].expand(world_size), msg=variant)

            if not gather_with_grad:
                if not local_loss:  # local features get the exact single-process gradient (no W factor)
                    for key in ("image_grad", "text_grad"):
                        torch.testing.assert_close(torch.cat([o[key] for o in outs]), want[key], msg=variant)
                continue

            # Gathering with grad: rank-local feature grads are W x the single-process ones ...
            for key in ("image_grad", "text_grad"):
                got = torch.cat([o[key] for o in outs]) / world_size
                torch.testing.assert_close(got, want[key], msg=variant)
            # ... and after DDP averaging every parameter gradient is exactly the single-process one.
            for key in ("image_proj_grad", "text_proj_grad", "log_scale_grad"):
                for o in outs:
                    torch.testing.assert_close(o[key], want[key], msg=f"{variant} {key}")
