"""Wrap the single-device CLIP module for training, in ONE fixed order (the model code knows none of this):

1. move to the device (fp32 master weights; bf16 comes from autocast in the loop, not from casting weights;
   `uses_bf16` is the one rule for both the autocast and FSDP's parameter dtype);
2. activation checkpointing (`model.set_grad_checkpointing(True)`): a property of the blocks, so it must be
   set before any wrapper hides the module;
3. the data-parallel wrapper, when the world size is above one:
   - FSDP2 (`train.fsdp`): `fully_shard` on every residual block of both towers, then on the root module
     (parameters become DTensors sharded over ranks; the optimizer is built after this step). Scalar
     parameters (the logit scale) stay replicated: fully_shard refuses 0-d tensors, so their gradients are
     averaged over ranks by the loop;
   - otherwise DDP (`DistributedDataParallel`, gradients all-reduced in buckets during backward);
4. `torch.compile` last (`train.compile`), on the wrapped module, so DDP's bucketing / FSDP's hooks are seen
   by the compiler (torch's recommended order).

`Wrapped.module` is the step-2 module for state dicts (with FSDP: the sharded root, still a CLIP: fully_shard
changes the module in place; `clip_model` finds the CLIP under any wrapper); `Wrapped.forward_module` is what the
loop calls; `Wrapped.gradient_sync(False)` lets backward passes accumulate gradients on each rank
without reducing them (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`), for micro-batch accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from clip.model.model import CLIP
from clip.train.distributed import DistInfo


@dataclass
class Wrapped:
    module: nn.Module  # the (possibly FSDP-sharded) model: state dicts and the optimizer use this one
    forward_module: nn.Module  # what the training loop calls (DDP and/or compiled wrapper)
    kind: str  # "none" | "ddp" | "fsdp"
    # FSDP only: parameters left out of sharding (scalars such as logit_scale, which fully_shard refuses);
    # the loop averages their gradients over ranks itself (`sync_replicated_grads`).
    replicated: list[nn.Parameter] = field(default_factory=list)

    def sync_replicated_grads(self, world_size: int) -> None:
        import torch.distributed as dist

        for param in self.replicated:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(world_size)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Backward passes run inside reduce gradients across ranks when `enabled` (as always outside); otherwise
        each rank accumulates its own gradients, to be reduced by the next synced backward. The forward of those
        backward passes must run inside too (DDP decides at forward time). A no-op for one process."""
        if enabled or self.kind == "none":
            yield
        elif self.kind == "ddp":
            ddp = getattr(self.forward_module, "_orig_mod", self.forward_module)  # under torch.compile
            with ddp.no_sync():
                yield
        else:  # fsdp
            self.module.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)  # type: ignore[operator]


def clip_model(module: nn.Module) -> CLIP:
    """The CLIP module under `module`'s wrappers: torch.compile (`_orig_mod`) and DDP (`module`) hold it; FSDP2's
    fully_shard changes it in place, so a sharded CLIP is one already. TypeError when there is none."""
    while not isinstance(module, CLIP):
        inner = getattr(module, "_orig_mod", None)
        inner = getattr(module, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            raise TypeError(f"no CLIP module under {type(module).__name__}")
        module = inner
    return module


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    from clip.model.transformer import ResidualAttentionBlock

    return [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]


def check_fsdp_world(fsdp: bool, world_size: int) -> None:
    """FSDP shards over ranks: on one process it would silently train unsharded, so it is refused."""
    if fsdp and world_size < 2:
        raise ValueError(f"train.fsdp needs more than one training process (world size {world_size}); set "
                         "train.fsdp=false or launch several processes (compute.nproc_per_node / compute.nnodes)")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the towers compute in bf16 (the autocast of clip/train/step.py and FSDP's parameter dtype alike):
    `train.precision` bf16, or auto on a GPU; fp32 otherwise."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def fsdp_precision(precision: str, device: torch.device) -> dict[str, torch.dtype | None]:
    """MixedPrecisionPolicy settings for `train.precision`: bf16 (`uses_bf16`) -> bf16 parameters in
    forward/backward with fp32 gradient reduction; fp32 -> no reduced dtypes."""
    if uses_bf16(precision, device):
        return {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
    return {"param_dtype": None, "reduce_dtype": None}


def wrap_model(model: nn.Module, info: DistInfo, *, grad_checkpointing: bool = False, fsdp: bool = False,
               compile_model: bool = False, channels_last: bool | None = None, precision: str = "auto") -> Wrapped:
    """`channels_last` (ResNet towers; None: on for CUDA without FSDP, whose flat shards would not keep the
    NHWC strides): NHWC convolution weights and activations, the faster layout for cuDNN. `precision` is
    `train.precision`; it sets FSDP's mixed-precision policy (`fsdp_precision`). FSDP on one process is refused."""
    check_fsdp_world(fsdp, info.world_size)
    model = model.to(info.device)
    if channels_last is None:
        channels_last = info.device.type == "cuda" and not (fsdp and info.distributed)
    if channels_last and hasattr(model, "set_channels_last"):
        model.set_channels_last(True)  # type: ignore[operator]  # a no-op for ViT towers
    if grad_checkpointing:
        model.set_grad_checkpointing(True)  # type: ignore[operator]
    kind = "none"
    forward_module: nn.Module = model
    replicated: list[nn.Parameter] = []
    if info.distributed:
        if fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(**fsdp_precision(precision, info.device))
            replicated = [p for p in model.parameters() if p.ndim == 0]
            for block in _residual_blocks(model):
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy, ignored_params=set(replicated))
            kind = "fsdp"
        else:
            from torch.nn.parallel import DistributedDataParallel

            forward_module = DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
            kind = "ddp"
    if compile_model:
        forward_module = torch.compile(forward_module)  # type: ignore[assignment]
    return Wrapped(module=model, forward_module=forward_module, kind=kind,
                   replicated=replicated if kind == "fsdp" else [])
