"""Feature-cache gradient accumulation (`train.accum_steps`): k micro-batches give the loss and the gradients of one
batch k times the size, in one process and in 2 real gloo processes (DDP, DDP with local_loss, FSDP2) against the
single-process global batch; an accumulated training run stopped and resumed ends with the weights of one that
never stopped; a per-rank batch that k does not divide is refused before any work."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip.config import load_config
from clip.loss import ClipLoss
from clip.model import create_model
from clip.train.distributed import DistInfo
from clip.train.step import NonFiniteLossError, accumulate_gradients
from clip.train.wrap import wrap_model
from tests.support.shards import make_shards
from tests.support.train_config import tiny_overrides

GLOBAL_BATCH = 8
RTOL, ATOL = 1e-5, 1e-6
SCALED_ATOL = 1e-5  # gradients: times the tensor's largest magnitude (the summation order differs: fp32 rounding)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny-vit", image_size=32, patch_size=8, vision_layers=1, text_layers=1, vision_width=64,
                        text_width=64, text_heads=2, embed_dim=32, context_length=16, vocab_size=600)


def _inputs(n: int = GLOBAL_BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 590, (n, 16), generator=g)
    lengths = torch.randint(3, 16, (n,), generator=g)
    for row, length in enumerate(lengths.tolist()):  # captions of different lengths: end-of-text, then padding
        tokens[row, length] = 599
        tokens[row, length + 1:] = 0
    return images, tokens


def _gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) gradients by parameter name; a collective under FSDP."""
    out = {}
    for name, param in module.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        out[name] = grad.detach().clone()
    return out


def _reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The single-process loss and gradients of the whole global batch in one forward (no accumulation)."""
    wrapped = wrap_model(_model(), DistInfo())
    images, tokens = _inputs()
    loss, _ = accumulate_gradients(wrapped, ClipLoss(), images, tokens, DistInfo(), use_bf16=False)
    return loss, _gradients(wrapped.module)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        atol = SCALED_ATOL * max(1.0, float(want[name].abs().max()))
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=atol, msg=f"{what}: {name}")


# ----------------------------------------------------------------------------------------------------------
# one process


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulation_matches_one_big_batch(accum_steps: int) -> None:
    want_loss, want_grads = _reference()
    wrapped = wrap_model(_model(), DistInfo())
    rows_with_grad: list[int] = []  # the vision tower's batch whenever it runs with a graph
    wrapped.module.visual.register_forward_pre_hook(
        lambda _, args: rows_with_grad.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
    images, tokens = _inputs()
    loss, _ = accumulate_gradients(wrapped, ClipLoss(), images, tokens, DistInfo(), use_bf16=False,
                                   accum_steps=accum_steps)
    torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)
    _assert_same(_gradients(wrapped.module), want_grads, f"accum_steps={accum_steps}")
    # activations with a graph are those of one micro-batch at a time, never of the whole batch
    assert rows_with_grad == [GLOBAL_BATCH // accum_steps] * accum_steps
    assert wrapped.module.logit_scale.grad.abs() > 0  # the scale's gradient is there (and counted once: above)


def test_per_rank_batch_not_divisible_by_accum_steps_is_refused() -> None:
    from clip.train.schedule import plan_schedule

    cfg = load_config(None, ["train.batch_size=24", "train.accum_steps=4"]).train
    assert plan_schedule(cfg, 4096, world_size=1).chunk >= 1  # 24 rows, 4 micro-batches of 6
    with pytest.raises(ValueError) as err:
        plan_schedule(cfg, 4096, world_size=4)  # 6 rows per rank
    message = str(err.value)
    assert "train.accum_steps (4)" in message and "per-rank batch (6" in message


# ----------------------------------------------------------------------------------------------------------
# two gloo processes: DDP, DDP + local_loss, FSDP2

VARIANTS = {"ddp": (False, False), "ddp-local-loss": (False, True), "fsdp": (True, False)}  # (fsdp, local_loss)


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        info = DistInfo(rank=rank, world_size=world_size)
        per_rank = GLOBAL_BATCH // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        images, tokens = _inputs()
        results = {}
        for variant, (fsdp, local_loss) in VARIANTS.items():
            wrapped = wrap_model(_model(), info, fsdp=fsdp, precision="fp32")
            loss_fn = ClipLoss(local_loss=local_loss, equal_batches=True)
            loss, _ = accumulate_gradients(wrapped, loss_fn, images[rows], tokens[rows], info, use_bf16=False,
                                           accum_steps=2)
            results[variant] = {"loss": loss, "grads": _gradients(wrapped.module)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_accumulating_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    world_size = 2
    mp.spawn(_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    want_loss, want_grads = _reference()
    for variant, (_, local_loss) in VARIANTS.items():
        losses = torch.stack([results[variant]["loss"] for results in per_rank])
        if local_loss:  # each rank's loss covers its rows; their mean is the global loss
            torch.testing.assert_close(losses.mean(), want_loss, rtol=RTOL, atol=ATOL, msg=variant)
        else:
            torch.testing.assert_close(losses, want_loss.expand(world_size), rtol=RTOL, atol=ATOL, msg=variant)
        for rank, results in enumerate(per_rank):
            _assert_same(results[variant]["grads"], want_grads, f"{variant} rank {rank}")


# ----------------------------------------------------------------------------------------------------------
# an accumulated run resumes exactly


def _train(data: Path, out: Path, **extra: object) -> object:
    from clip.train import stage

    cfg = load_config(None, tiny_overrides(str(data), str(out), **{
        "train.accum_steps": 4, "train.epochs": 2, "train.checkpoint_every": 4, "train.max_nonfinite_steps": 1,
        **extra}))
    return stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, debug=cfg.debug)


def test_accumulated_run_stopped_and_resumed_ends_with_the_same_weights(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=96, per_shard=32)  # batch 16: 6 steps per epoch, 12 in all
    reference = _train(tmp_path / "shards", tmp_path / "ref")
    assert reference.metrics["steps"] == 12 and reference.metrics["nonfinite_steps"] == 0
    with pytest.raises(NonFiniteLossError):  # a NaN at step 7 stops the run (seen at the logging step 8)
        _train(tmp_path / "shards", tmp_path / "run", **{"debug.fault_nonfinite_steps": "[7]"})
    assert not (tmp_path / "run" / "final.pt").exists()
    resumed = _train(tmp_path / "shards", tmp_path / "run")
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["steps"] == 12
    a = torch.load(tmp_path / "ref" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert a["train_config"]["accum_steps"] == 4
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=0, atol=0, msg=name)
