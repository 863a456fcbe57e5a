"""Contrastive training: launcher-agnostic process setup, the resumable shard stream, wrappers, the loop and
checkpoints. Entry point: `python -m pipelines.train` (or `clip-pipeline train`); the library call is

    from clip.train import train
    metrics = train(cfg)   # one process, or one rank under torchrun / srun

Modules: `distributed` (env -> process group), `data` (manifest, tar streaming, deterministic streams),
`wrap` (checkpointing -> DDP/FSDP2 -> compile, in that order), `loop` (the worker), `checkpoint` (storage).
"""

from clip.train.loop import NonFiniteLossError, WarmupCosine, plan_schedule, train

__all__ = ["NonFiniteLossError", "WarmupCosine", "plan_schedule", "train"]
