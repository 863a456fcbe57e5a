"""Training-step numerics: the logit-scale clamp, the fp32 loss outside autocast, the non-finite gradient guard,
and the device / FSDP settings. Direct unit tests of train_step on a tiny model (no data, no process group)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from clip.config import ComputeConfig, load_config
from clip.loss import ClipLoss
from clip.model import create_model
from clip.optim import build_optimizer
from clip.train.distributed import DistInfo
from clip.train.state import TrainState
from clip.train.step import train_step
from clip.train.wrap import wrap_model
from tests.support.shards import make_shards
from tests.support.train_config import tiny_overrides

LN_100 = math.log(100.0)


def _state(lr: float = 1e-3, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = create_model("tiny-vit", image_size=32, patch_size=8, vision_layers=1, text_layers=1, vision_width=64,
                         text_width=64, text_heads=2, embed_dim=32, context_length=16, vocab_size=600)
    wrapped = wrap_model(model, DistInfo())
    optimizer = build_optimizer(wrapped.module, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return TrainState(wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, tokenizer=None,  # type: ignore[arg-type]
                      model_config={}, train_config={}, data_version="", start_step=0, data_state=None)  # type: ignore[arg-type]


def _inputs(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 590, (n, 16), generator=g)
    tokens[:, -1] = 599  # an end-of-text id (the largest) so pooling has a row
    return images, tokens


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.wrapped.module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# 1. logit scale clamped in place after the optimizer step


def test_logit_scale_is_clamped_in_place_after_the_step() -> None:
    state = _state(lr=1e-2)
    with torch.no_grad():
        state.wrapped.module.logit_scale.fill_(LN_100 + 0.5)
    images, tokens = _inputs()
    outcome = train_step(state, ClipLoss(), images, tokens, DistInfo(), use_bf16=False)
    assert outcome.finite
    assert float(state.wrapped.module.logit_scale) <= LN_100 + 1e-6

    with torch.no_grad():
        state.wrapped.module.logit_scale.fill_(-0.5)
    train_step(state, ClipLoss(), images, tokens, DistInfo(), use_bf16=False)
    assert float(state.wrapped.module.logit_scale) >= 0.0


# ---------------------------------------------------------------------------------------------------------
# 2. logits and loss in fp32, outside autocast


class _MatmulDtypes(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.out_dtypes: list[torch.dtype] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm):
            self.out_dtypes.append(out.dtype)
        return out


class _RecordingLoss(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = ClipLoss()
        self.autocast: list[bool] = []
        self.inputs: list[tuple[torch.Tensor, ...]] = []
        self.mode = _MatmulDtypes()

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        self.inputs.append((image.detach().clone(), text.detach().clone(), scale.detach().clone()))
        with self.mode:
            return self.inner(image, text, scale)


def test_bf16_step_computes_logits_and_loss_in_fp32_outside_autocast() -> None:
    state = _state()
    images, tokens = _inputs()
    loss_fn = _RecordingLoss()
    outcome = train_step(state, loss_fn, images, tokens, DistInfo(), use_bf16=True)
    assert outcome.finite
    assert loss_fn.autocast == [False]
    assert loss_fn.mode.out_dtypes and all(d == torch.float32 for d in loss_fn.mode.out_dtypes)
    image, text, scale = loss_fn.inputs[0]
    assert image.dtype == text.dtype == scale.dtype == torch.float32
    expected = float(ClipLoss()(image, text, scale))
    assert outcome.loss == pytest.approx(expected, rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# 3. non-finite gradients skip the update


def test_inf_gradient_with_finite_loss_skips_the_update() -> None:
    state = _state()
    before = _weights(state)
    param = state.wrapped.module.text_projection
    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    images, tokens = _inputs()
    try:
        outcome = train_step(state, ClipLoss(), images, tokens, DistInfo(), use_bf16=False)
    finally:
        handle.remove()
    assert not outcome.finite
    assert math.isnan(outcome.loss)
    after = _weights(state)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in state.wrapped.module.parameters())
    # the next clean step trains again
    assert train_step(state, ClipLoss(), images, tokens, DistInfo(), use_bf16=False).finite
    assert not torch.equal(before["text_projection"], state.wrapped.module.text_projection.detach())


def test_no_step_checkpoint_inside_a_nonfinite_streak(tmp_path: Path) -> None:
    from clip.train import stage

    make_shards(tmp_path / "shards", n=128, per_shard=32)
    out = tmp_path / "out"
    cfg = load_config(None, tiny_overrides(str(tmp_path / "shards"), str(out), **{
        "train.checkpoint_every": 2, "train.max_nonfinite_steps": 3, "debug.fault_nonfinite_steps": "[4, 5]"}))
    result = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, debug=cfg.debug)
    assert result.metrics["nonfinite_steps"] == 2
    written = sorted(p.name for p in out.glob("step-*.pt"))
    assert "step-00000004.pt" not in written  # step 4 is inside the streak (steps 4, 5)
    assert "step-00000006.pt" in written


# ---------------------------------------------------------------------------------------------------------
# 4. device default, FSDP on one process, FSDP mixed precision


def test_compute_device_defaults_to_auto() -> None:
    assert ComputeConfig().device == "auto"
    assert "CUDA when available" in (ComputeConfig.model_fields["device"].description or "")


def test_fsdp_on_one_process_is_refused_with_one_line() -> None:
    from clip.train.wrap import check_fsdp_world

    check_fsdp_world(False, 1)
    check_fsdp_world(True, 2)
    with pytest.raises(ValueError) as err:
        check_fsdp_world(True, 1)
    message = str(err.value)
    assert "\n" not in message and "train.fsdp" in message and "world size 1" in message


def test_wrap_model_refuses_fsdp_on_one_process() -> None:
    model = create_model("tiny-vit", image_size=32, patch_size=8, vision_layers=1, text_layers=1, vision_width=64,
                         text_width=64, text_heads=2, embed_dim=32, context_length=16, vocab_size=600)
    with pytest.raises(ValueError, match="train.fsdp"):
        wrap_model(model, DistInfo(), fsdp=True)


@pytest.mark.parametrize(("precision", "device", "param_dtype"), [
    ("fp32", "cuda", None), ("fp32", "cpu", None), ("bf16", "cuda", torch.bfloat16), ("bf16", "cpu", torch.bfloat16),
    ("auto", "cuda", torch.bfloat16), ("auto", "cpu", None),
])
def test_fsdp_mixed_precision_follows_train_precision(precision: str, device: str,
                                                      param_dtype: torch.dtype | None) -> None:
    from clip.train.wrap import fsdp_precision

    settings = fsdp_precision(precision, torch.device(device))
    assert settings["param_dtype"] == param_dtype
    assert settings["reduce_dtype"] == (torch.float32 if param_dtype is not None else None)
