"""Process-group setup for one training process, whoever launched it.

Three launchers give the same environment contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

* `torchrun` (torch.distributed.run) sets them itself;
* SLURM `srun` sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID / SLURM_NODELIST: `slurm_env()` maps them
  (MASTER_ADDR = first host of the node list, MASTER_PORT from the environment or 29500 + job id % 1000);
* nothing: a single process, no process group at all (world size 1).

NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from clip.compute import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[01-04,07],cpu1' -> 'gpu01'; 'node7' -> 'node7'."""
    nodelist = nodelist.strip()
    match = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_NODELIST {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",", 1)[0].split("-", 1)[0]
    return prefix + first


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch's env:// variables derived from a SLURM task's environment (empty when not in an srun step).

    The world size is the job step's task count (`SLURM_STEP_NUM_TASKS`, set by srun), not the allocation's
    `SLURM_NTASKS`: a batch script run by sbatch with `--ntasks 8` is one process, and taking it for rank 0 of 8
    would wait forever for the other seven.
    """
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_slurm_host(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    return out


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    """True in a process started by torchrun (or srun): the worker side of `pipelines.train`."""
    env = os.environ if env is None else env
    return ("RANK" in env and "WORLD_SIZE" in env) or (
        "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    )


def init_distributed(device_kind: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the environment (torchrun, srun), or run as one process."""
    if "RANK" not in os.environ:
        os.environ.update(slurm_env(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_kind, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict = {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            # Under torchrun the agent hosts the store and keeps it across worker restarts. Keys of the
            # previous attempt (e.g. a killed rank's gloo address) would be read again by the new process
            # group, which then connects to a dead peer; a per-attempt prefix keeps each attempt apart.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            agent_store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
            kwargs = {"store": dist.PrefixStore(f"clip-train/attempt-{attempt}", agent_store),
                      "rank": rank, "world_size": world_size}
        dist.init_process_group(
            backend=backend, timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None, **kwargs,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def all_reduce_(tensor: torch.Tensor, info: DistInfo, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if info.distributed:
        if tensor.device != info.device:  # NCCL reduces device tensors only (a host counter: "no backend for cpu")
            staged = tensor.to(info.device)
            dist.all_reduce(staged, op=op)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=op)
    return tensor


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
