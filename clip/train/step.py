"""One training step: inputs to the device, forward, global-batch loss, the non-finite guard, backward, AdamW and
learning-rate step.

Guarantees:
- bf16 autocast for the towers when `use_bf16` (clip/train/wrap.py `uses_bf16`: `train.precision` bf16, or auto
  on a GPU), fp32 otherwise; the logits and the loss (`train.loss`, clip.loss.ClipLoss or
  clip.sigmoid_loss.SigLipLoss) are computed in fp32, outside autocast, over the features of the whole global
  batch (the loss does its own cross-rank communication);
- `train.accum_steps` = k > 1 (feature-cache accumulation, `accumulate_gradients`): the per-rank batch is split
  into k micro-batches; their features are computed once without gradients, then each micro-batch is recomputed
  with gradients against the cached features of all the others (and of every rank), and its backward adds its
  share. The loss and every gradient are those of the whole global batch at once (up to float rounding); the
  activation memory is that of one micro-batch. Gradients are reduced across ranks once, in the last backward;
- the weights are updated only if the loss AND every gradient are finite on EVERY rank (one all-reduced MIN
  after backward), so ranks never diverge; a skipped step still advances the learning-rate schedule and the
  data (the step is spent, and counted);
- after each update the log logit scale is clamped in place to [0, ln 100] (`CLIP.clamp_logit_scale_`);
- no host synchronisation inside a step when the optimizer is a fused AdamW: the skip decision stays on the
  device (the fused kernel's `found_inf` skips the update and rolls back its step count), and `StepOutcome` holds
  device tensors that the loop reads only at logging steps. Any other optimizer costs one sync per step (the
  skip decision is read on the host);
- `train.max_nonfinite_steps` skipped steps in a row raise NonFiniteLossError (`NonFiniteGuard`); the count lives
  on the device and is read at logging and checkpoint steps, so the stop comes at the first of those at or after
  the step that reached the limit (up to `train.log_every` - 1 steps late); nothing is written on the way out,
  so the newest checkpoint stays the last good state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clip.model.model import check_token_range, trimmed_text_length
from clip.train.distributed import DistInfo, all_reduce_
from clip.train.gpu_decode import gpu_decode_batch
from clip.train.loader import Batch
from clip.train.state import TrainState
from clip.train.wrap import Wrapped, clip_model


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the newest checkpoint is the last good state."""


@dataclass(frozen=True)
class StepOutcome:
    """What a step leaves, as device tensors nobody has read yet; `finite` and `loss` read them (a device sync)."""

    finite_flag: torch.Tensor  # [] bool: the loss was finite on every rank and the weights were updated
    loss_value: torch.Tensor  # [] fp32 detached: this rank's loss of the global batch; nan when skipped
    logit_scale: torch.Tensor  # [] detached

    @property
    def finite(self) -> bool:
        return bool(self.finite_flag)

    @property
    def loss(self) -> float:
        return float(self.loss_value)


def device_inputs(batch: Batch, image_size: int, device: torch.device, *, vocab_size: int | None = None,
                  trim_text: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images [n, 3, S, S], tokens [n, L], images that could not be decoded) on `device`. With
    `train.gpu_decode` the loader hands (JPEG bytes, crop box) pairs, decoded and cropped here; a pair whose image
    no decoder can read is dropped, its caption with it (never replaced by another image).

    `vocab_size`: the token ids are checked against it on the host (ValueError naming the bad id) and
    `trim_text` cuts the padding after the batch's last end-of-text token (clip.model.model.trimmed_text_length,
    exact: attention is causal), both before the transfer, so the model needs no host sync for them
    (the model's `tokens_checked`)."""
    tokens = batch.tokens
    if isinstance(batch.images, list):
        images, keep, failed = gpu_decode_batch(batch.images, image_size, device)
        tokens = tokens[keep] if failed else tokens
    else:
        images, failed = batch.images.to(device, non_blocking=True), 0
    if vocab_size is not None:
        tokens = _checked_host_tokens(tokens, vocab_size, trim_text)
    return images, tokens.to(device, non_blocking=True), failed


def _checked_host_tokens(tokens: torch.Tensor, vocab_size: int, trim: bool) -> torch.Tensor:
    """tokens [n, L] on the CPU: ids checked against `vocab_size`, padding trimmed when `trim`; numpy on the
    host tensor, never a device read."""
    ids = tokens.numpy()  # [n, L], a view
    if ids.size == 0:
        return tokens
    check_token_range(int(ids.max()), int(ids.min()), vocab_size)
    if not trim:
        return tokens
    last_eot = int(ids.argmax(axis=-1).max())  # end-of-text is the highest id
    used = trimmed_text_length(last_eot, ids.shape[1])
    return tokens[:, :used]


def mark_tokens_checked(wrapped: Wrapped) -> None:
    """Tell the model that its token inputs come from `device_inputs(..., vocab_size=...)`: checked and trimmed on
    the host, so encode_text skips its own check (a host sync)."""
    wrapped.module.tokens_checked = True


def _loss_of(loss_fn: torch.nn.Module, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """The loss in fp32 (the caller is outside autocast); the bias only when the model has one."""
    if bias is None:
        return loss_fn(image, text, scale.float())
    return loss_fn(image, text, scale.float(), bias.float())


def accumulate_gradients(wrapped: Wrapped, loss_fn: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                         info: DistInfo, *, use_bf16: bool, accum_steps: int = 1,
                         poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this rank's part of the global batch (collective): every parameter's `.grad` holds
    the gradient of the global-batch loss, reduced over ranks as the wrapper does it (DDP / FSDP, the replicated
    scalars averaged). Returns (loss [] detached, logit_scale [] detached).

    `accum_steps` = k > 1: images [n, ...] and tokens [n, L] are split into k micro-batches
    (torch.tensor_split: equal when k divides n); features of all of them first without a graph, then each
    micro-batch again with its graph, its live rows spliced into the cached ones. The logit scale (and bias) is
    live in one micro-step only, so its gradient is counted once (d loss / d scale does not depend on which rows
    are live); it is the last one, the synced backward, so DDP sees every parameter used there.
    `poison` makes the loss NaN (debug.fault_nonfinite_steps)."""
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    image_parts, token_parts = images.tensor_split(accum_steps), tokens.tensor_split(accum_steps)
    cached_image = cached_text = None  # [n, D] fp32: every micro-batch's features, without a graph (k > 1 only)
    if accum_steps > 1:
        with torch.no_grad(), autocast:
            cached = [wrapped.forward_module(i, t) for i, t in zip(image_parts, token_parts, strict=True)]
        cached_image = torch.cat([o.image_features.float() for o in cached])
        cached_text = torch.cat([o.text_features.float() for o in cached])
        del cached
    start = 0
    for j, (image_part, token_part) in enumerate(zip(image_parts, token_parts, strict=True)):
        stop = start + image_part.shape[0]
        last = j == accum_steps - 1
        with wrapped.gradient_sync(last):
            with autocast:
                out = wrapped.forward_module(image_part, token_part)
            # The logits and the loss in fp32, outside the autocast region (autocast would run the matmul in bf16).
            image, text = out.image_features.float(), out.text_features.float()  # [m, D] live rows
            if cached_image is not None and cached_text is not None:  # splice them into the cache -> [n, D]
                image = torch.cat([cached_image[:start], image, cached_image[stop:]])
                text = torch.cat([cached_text[:start], text, cached_text[stop:]])
            bias = getattr(out, "logit_bias", None)
            scale = out.logit_scale if last else out.logit_scale.detach()
            bias = bias if (last or bias is None) else bias.detach()
            loss = _loss_of(loss_fn, image, text, scale, bias)
            if poison:
                loss = loss * float("nan")
            loss.backward()
        start = stop
    wrapped.sync_replicated_grads(info.world_size)
    return loss.detach(), out.logit_scale.detach()


def train_step(state: TrainState, loss_fn: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
               info: DistInfo, *, use_bf16: bool, poison: bool = False, accum_steps: int = 1) -> StepOutcome:
    """One optimisation step on this rank's part of the global batch (collective: every rank calls it).
    `poison` makes the loss NaN (debug.fault_nonfinite_steps); `accum_steps` as in `accumulate_gradients`."""
    wrapped = state.wrapped
    # Every rank runs backward (DDP / FSDP / the feature gather are collectives in it), then ONE all-reduced MIN
    # decides: the loss and every gradient finite on every rank, or no update anywhere.
    loss, logit_scale = accumulate_gradients(wrapped, loss_fn, images, tokens, info, use_bf16=use_bf16,
                                             accum_steps=accum_steps, poison=poison)
    finite = (torch.isfinite(loss) & _grads_finite(wrapped.module)).to(torch.int32).reshape(1)
    all_reduce_(finite, info, dist.ReduceOp.MIN)
    finite = finite.reshape(()).bool()  # [] on the device
    _step_if_finite(state.optimizer, finite)
    # idempotent: a skipped step leaves the clamped value as it was; clamp_ in place works on an FSDP2 DTensor too
    clip_model(wrapped.module).clamp_logit_scale_()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    loss_value = torch.where(finite, loss.float(), math.nan)
    return StepOutcome(finite_flag=finite, loss_value=loss_value, logit_scale=logit_scale)


def _fused_adam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in optimizer.param_groups)


def _step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() when `finite` ([] bool on the device); otherwise nothing changes (weights, moments, step
    counts). Fused Adam/AdamW decide on the device (`found_inf`); any other optimizer reads `finite` (one sync)."""
    if not _fused_adam(optimizer):
        if bool(finite):
            optimizer.step()
        return
    optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]  # [] 1.0: the kernel skips everything
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]  # never left for a later step() outside this one


def _grads_finite(module: torch.nn.Module) -> torch.Tensor:
    """[] bool on the device: every gradient of this rank (its local shard under FSDP) is finite; no sync."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: DTensor -> local shard
    if not grads:
        return torch.ones((), dtype=torch.bool, device=next(module.parameters()).device)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


class NonFiniteGuard:
    """Counts skipped steps on the device (`record`: no sync); `check` reads the counts (one sync) and stops the run
    once `limit` steps in a row were skipped at any point, even if a finite step followed before the check."""

    def __init__(self, limit: int, output: str) -> None:
        self.limit, self.output = limit, output
        self._in_a_row: torch.Tensor | None = None  # [] int64 on the device: the current streak
        self._longest: torch.Tensor | None = None  # [] int64: the longest streak of the run
        self._total: torch.Tensor | None = None  # [] int64: skipped steps of the run

    def record(self, finite: torch.Tensor | bool) -> None:
        skipped = (~torch.as_tensor(finite, dtype=torch.bool)).long()  # [] 1 when skipped
        if self._in_a_row is None or self._longest is None or self._total is None:
            self._in_a_row = self._longest = self._total = skipped
            return
        self._in_a_row = (self._in_a_row + skipped) * skipped
        self._longest = torch.maximum(self._longest, self._in_a_row)
        self._total = self._total + skipped

    @property
    def in_a_row(self) -> int:
        return 0 if self._in_a_row is None else int(self._in_a_row)

    @property
    def total(self) -> int:
        return 0 if self._total is None else int(self._total)

    def check(self, step: int) -> None:
        longest = 0 if self._longest is None else int(self._longest)
        if longest >= self.limit:
            raise NonFiniteLossError(
                f"{longest} consecutive non-finite losses (train.max_nonfinite_steps = {self.limit}) by step "
                f"{step}; stopped. The newest checkpoint in {self.output} is the last good state: lower train.lr "
                "or check the data, then rerun to resume."
            )
