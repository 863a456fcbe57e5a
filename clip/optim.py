"""AdamW for CLIP with the paper's weight-decay rule.

Decay applies to weight matrices and convolution kernels only: gains (LayerNorm / BatchNorm weights),
biases, embeddings (class, positional and token embeddings) and the logit scale are not decayed.

    optimizer = build_optimizer(model, lr=5e-4, weight_decay=0.2)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies to the parameter called `name`."""
    if param.ndim < 2:  # gains, biases, class embedding, logit scale
        return False
    parts = name.split(".")
    if any("embedding" in part for part in parts):  # positional / token / attention-pool position embeddings
        return False
    return parts[-1] != "logit_scale"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decayed (weight_decay) and not (0.0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if is_decayed(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.2,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`; the fused kernel when every parameter is on CUDA or the
    CPU (it also skips a step without a host sync: clip.train.step sets its `found_inf`)."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    groups = param_groups(model, weight_decay)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("model has no trainable parameters")
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
