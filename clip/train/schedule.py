"""The step schedule of a run: how many data streams, samples per stream per step, steps per epoch and in all,
and the learning-rate factor per step.

Guarantees: `plan_schedule` refuses (ValueError naming the keys) a global batch that does not split evenly over
the processes and the streams, and an epoch with no full step, before any work starts; the schedule is a pure
function of the train section, the data size and the world size. `WarmupCosine` is plain data, so the
scheduler's state dict in a checkpoint loads with `weights_only=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clip.config import TrainConfig


class WarmupCosine:
    """LambdaLR factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total` steps.
    A callable object (not a closure) so LambdaLR's state_dict stays plain data."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    num_streams: int
    chunk: int  # samples per stream per step
    steps_per_epoch: int
    total_steps: int


def plan_schedule(tcfg: TrainConfig, plan_total_samples: int, world_size: int) -> Schedule:
    """Streams, per-stream chunk and step counts; refuses batch sizes that do not divide evenly."""
    if tcfg.batch_size % world_size:
        raise ValueError(
            f"train.batch_size ({tcfg.batch_size}) is the GLOBAL batch and must be a multiple of the world size "
            f"({world_size} processes)"
        )
    streams = tcfg.streams or world_size * max(1, tcfg.num_workers)
    if streams % world_size:
        raise ValueError(f"train.streams ({streams}) must be a multiple of the world size ({world_size})")
    if tcfg.batch_size % streams:
        raise ValueError(
            f"train.batch_size ({tcfg.batch_size}) must be a multiple of the number of data streams ({streams}; "
            "train.streams, default world_size * num_workers)"
        )
    chunk = tcfg.batch_size // streams
    if tcfg.samples_per_epoch is not None:
        steps_per_epoch = tcfg.samples_per_epoch // tcfg.batch_size
    else:
        steps_per_epoch = (plan_total_samples // streams) // chunk
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has no full step: {tcfg.samples_per_epoch or plan_total_samples} samples per epoch for a "
            f"global batch of {tcfg.batch_size} (train.batch_size)"
        )
    return Schedule(streams, chunk, steps_per_epoch, steps_per_epoch * tcfg.epochs)
