"""Config overrides for the training tests (no tests here): a tiny model that trains in seconds on a CPU."""

from __future__ import annotations

from typing import Any


def tiny_overrides(data: str, output: str, **extra: Any) -> list[str]:
    """`--set` overrides for a tiny fast run (32 px, 1 layer per tower, vocab 600)."""
    base = {
        "train.data": data,
        "train.output": output,
        "train.model": "tiny-vit",
        "train.model_overrides": "{image_size: 32, patch_size: 8, vision_layers: 1, text_layers: 1, "
                                 "vision_width: 64, text_width: 64, text_heads: 2, embed_dim: 32, context_length: 16}",
        "train.tokenizer.vocab_size": 600,
        "train.tokenizer.context_length": 16,
        "train.batch_size": 16,
        "train.epochs": 1,
        "train.num_workers": 0,
        "train.shuffle_buffer": 32,
        "train.warmup_steps": 2,
        "train.lr": 2e-3,
        "train.log_every": 2,
        "train.checkpoint_every": 4,
        "tracking.enabled": False,
        "compute.device": "cpu",
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]
