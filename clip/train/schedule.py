"""The step schedule of a run: how many data streams, samples per stream per step, steps per epoch and in all,
and the learning-rate factor per step.

Guarantees: `plan_schedule` refuses (ValueError naming the keys) a global batch that does not split evenly over
the processes and the streams, a per-rank batch that `train.accum_steps` does not divide, and an epoch with no full step, before any work starts; the schedule is a pure
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


# Samples per stream per step under the default stream count: few enough streams that each reads long runs of
# one shard (and holds few shuffle windows), enough that a 32,768 batch has 4,096 streams to spread over ranks.
DEFAULT_CHUNK = 8


def default_streams(batch_size: int) -> int:
    """The stream count when `train.streams` is unset: the largest divisor of the global batch that leaves at least
    DEFAULT_CHUNK samples per stream per step. A function of the batch size alone, never of the world size or of
    `num_workers`, so an elastic restart on fewer nodes, or with more loader workers, reads the same streams and
    resumes exactly (64 -> 8, 512 -> 64, 32768 -> 4096, 100 -> 10)."""
    limit = max(1, batch_size // DEFAULT_CHUNK)
    return max(d for d in range(1, limit + 1) if batch_size % d == 0)


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
    per_rank = tcfg.batch_size // world_size
    if per_rank % tcfg.accum_steps:
        raise ValueError(
            f"train.accum_steps ({tcfg.accum_steps}) must divide the per-rank batch ({per_rank} = train.batch_size "
            f"{tcfg.batch_size} / {world_size} processes) into equal micro-batches"
        )
    streams = tcfg.streams or default_streams(tcfg.batch_size)
    if streams % world_size:
        how = "train.streams" if tcfg.streams else f"the default for train.batch_size {tcfg.batch_size}"
        raise ValueError(f"train.streams ({streams}, {how}) must be a multiple of the world size ({world_size}); "
                         "set train.streams to a multiple of it that divides train.batch_size")
    if tcfg.batch_size % streams:
        raise ValueError(
            f"train.batch_size ({tcfg.batch_size}) must be a multiple of the number of data streams ({streams}; "
            "train.streams)"
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
