"""One training step: inputs to the device, forward, global-batch loss, the non-finite guard, backward, AdamW and
learning-rate step.

Guarantees:
- bf16 autocast on GPU (`train.precision` auto or bf16), fp32 otherwise, for the towers; the logits and the
  contrastive loss are computed in fp32, outside autocast, over the features of the whole global batch
  (all-gathered across ranks, clip.loss.ClipLoss);
- the weights are updated only if the loss AND every gradient are finite on EVERY rank (one all-reduced MIN
  after backward), so ranks never diverge; a skipped step still advances the learning-rate schedule and the
  data (the step is spent, and counted);
- after each update the log logit scale is clamped in place to [0, ln 100];
- `train.max_nonfinite_steps` skipped steps in a row raise NonFiniteLossError (`NonFiniteGuard`); nothing is
  written on the way out, so the newest checkpoint stays the last good state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clip.model.model import LOGIT_SCALE_MAX
from clip.train.distributed import DistInfo, all_reduce_
from clip.train.gpu_decode import gpu_decode_batch
from clip.train.loader import Batch
from clip.train.state import TrainState


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the newest checkpoint is the last good state."""


@dataclass(frozen=True)
class StepOutcome:
    finite: bool  # the loss was finite on every rank and the weights were updated
    loss: float  # this rank's loss; nan when the step was skipped
    logit_scale: torch.Tensor  # [] detached, on the device: read (a device sync) only when metrics are logged


def device_inputs(batch: Batch, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images [n, 3, S, S], tokens [n, ctx], images that could not be decoded) on `device`. With
    `train.gpu_decode` the loader hands (JPEG bytes, crop box) pairs, decoded and cropped here; a pair whose image
    no decoder can read is dropped, its caption with it (never replaced by another image)."""
    if isinstance(batch.images, list):
        images, keep, failed = gpu_decode_batch(batch.images, image_size, device)
        tokens = batch.tokens[keep] if failed else batch.tokens
        return images, tokens.to(device, non_blocking=True), failed
    return batch.images.to(device, non_blocking=True), batch.tokens.to(device, non_blocking=True), 0


def train_step(state: TrainState, loss_fn: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
               info: DistInfo, *, use_bf16: bool, poison: bool = False) -> StepOutcome:
    """One optimisation step on this rank's part of the global batch (collective: every rank calls it).
    `poison` makes the loss NaN (debug.fault_nonfinite_steps)."""
    wrapped = state.wrapped
    with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = wrapped.forward_module(images, tokens)
    # The logits and the loss in fp32, outside the autocast region (autocast would run the matmul in bf16).
    loss = loss_fn(out.image_features.float(), out.text_features.float(), out.logit_scale.float())
    if poison:
        loss = loss * float("nan")
    # Every rank runs backward (DDP / FSDP / the feature gather are collectives in it), then ONE all-reduced MIN
    # decides: the loss and every gradient finite on every rank, or no update anywhere.
    loss.backward()
    wrapped.sync_replicated_grads(info.world_size)
    finite = (torch.isfinite(loss.detach()) & _grads_finite(wrapped.module)).to(torch.int32).reshape(1)
    all_reduce_(finite, info, dist.ReduceOp.MIN)
    update = bool(finite.item())
    loss_value = math.nan
    if update:
        state.optimizer.step()
        clamp_logit_scale_(wrapped.module)
        loss_value = float(loss.detach())
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    return StepOutcome(finite=update, loss=loss_value, logit_scale=out.logit_scale.detach())


def _grads_finite(module: torch.nn.Module) -> torch.Tensor:
    """[] bool on the device: every gradient of this rank (its local shard under FSDP) is finite; no sync."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: DTensor -> local shard
    if not grads:
        return torch.ones((), dtype=torch.bool, device=next(module.parameters()).device)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def clamp_logit_scale_(module: torch.nn.Module) -> None:
    """Keep the log logit scale in [0, ln 100] after each update (as CLIP and open_clip do): the forward clamp alone
    zeroes its gradient above ln 100, and Adam's momentum could carry the parameter past and leave it there."""
    param = getattr(module, "logit_scale", None)
    if isinstance(param, torch.Tensor):
        with torch.no_grad():
            param.clamp_(0.0, math.log(LOGIT_SCALE_MAX))


class NonFiniteGuard:
    """Counts skipped steps; stops the run after `limit` in a row."""

    def __init__(self, limit: int, output: str) -> None:
        self.limit, self.output = limit, output
        self.in_a_row = 0
        self.total = 0

    def record(self, finite: bool) -> None:
        if finite:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.total += 1

    def check(self, step: int) -> None:
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} consecutive non-finite losses (train.max_nonfinite_steps = {self.limit}) at step "
                f"{step}; stopped. The newest checkpoint in {self.output} is the last good state: lower train.lr "
                "or check the data, then rerun to resume."
            )
