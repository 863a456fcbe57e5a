"""The training state of one rank, and how it becomes a checkpoint dict (docs/formats.md "Checkpoints").

Guarantees:
- a checkpoint dict is the same whatever the wrapping (plain, DDP, FSDP2): full, unsharded tensors on the CPU
  under the bare module's parameter names, with the keys of clip.formats.checkpoint (MODEL_KEYS and
  TRAINING_STATE_KEYS) in one fixed order, so the same state gives the same bytes;
- with FSDP every rank takes part in the gather (it is a collective) and only rank 0 writes; otherwise only rank 0
  builds and writes the dict;
- the data position saved is the global one: every logical stream's position, each contributed by the one rank
  that reads it, so a resume on any world size continues every stream where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clip.config import StorageConfig
from clip.formats.checkpoint import MLFLOW_RUN_KEY
from clip.tokenizer import Tokenizer
from clip.train.checkpoint import rng_state, save_checkpoint
from clip.train.distributed import DistInfo, all_reduce_
from clip.train.loader import Batch
from clip.train.streams import DataState
from clip.train.wrap import Wrapped


def _state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(wrapped: Wrapped) -> dict[str, torch.Tensor]:
    """The full model state dict on the CPU (FSDP: gathered from every rank; a collective)."""
    if wrapped.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(wrapped.module, options=_state_options())
    return {k: v.detach().cpu().clone() for k, v in wrapped.module.state_dict().items()}


def optimizer_state(wrapped: Wrapped, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state dict on the CPU (FSDP: gathered from every rank; a collective)."""
    if wrapped.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped.module, optimizer, options=_state_options())
    state = optimizer.state_dict()
    return {"state": {k: {n: (t.detach().cpu() if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
                      for k, v in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_optimizer_state(wrapped: Wrapped, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The model weights are loaded into the bare module before wrapping; this restores the optimizer."""
    if wrapped.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(wrapped.module, optimizer, state, options=_state_options())
    else:
        optimizer.load_state_dict(state)


@dataclass
class TrainState:
    """What a rank trains and checkpoints: the wrapped model with its optimizer and LR schedule, the tokenizer,
    and where training starts (`start_step`, `data_state`: fresh, or restored from a checkpoint)."""

    wrapped: Wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: Tokenizer
    model_config: dict[str, Any]  # CLIPConfig.to_dict()
    train_config: dict[str, Any]  # the resolved train section, as JSON data
    data_version: str
    start_step: int
    data_state: DataState
    mlflow_run_id: str | None = None  # this segment's tracking run; a resumed segment links to it by a tag

    @property
    def image_size(self) -> int:
        return int(self.model_config["vision"]["image_size"])

    def checkpoint(self, step: int, data_state: DataState) -> dict[str, Any]:
        """The checkpoint dict at `step` (FSDP: a collective, every rank calls it)."""
        return {
            "model": model_state(self.wrapped),
            "model_config": self.model_config,
            "tokenizer": self.tokenizer.to_json(),
            "train_config": self.train_config,
            "optimizer": optimizer_state(self.wrapped, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "step": step,
            "samples_seen": step * int(self.train_config["batch_size"]),
            "data_state": data_state.to_dict(),
            "rng": rng_state(),
            "data_version": self.data_version,
            MLFLOW_RUN_KEY: self.mlflow_run_id,
        }


def save_training_state(state: TrainState, uri: str, step: int, data_state: DataState, info: DistInfo,
                        storage_cfg: StorageConfig | None = None) -> bool:
    """Write the checkpoint of `step` to `uri` from rank 0 (every rank calls it: with FSDP the gather is a
    collective). True on the rank that wrote it. No barrier: the caller decides where the ranks meet."""
    if not (info.is_main or state.wrapped.kind == "fsdp"):
        return False
    checkpoint = state.checkpoint(step, data_state)
    if info.is_main:
        save_checkpoint(uri, checkpoint, storage_cfg)
    return info.is_main


class DataPosition:
    """Where this rank's logical streams stand after the last trained step, and the global `DataState` to save."""

    def __init__(self, start: DataState, rank_streams: tuple[int, ...], steps_per_epoch: int) -> None:
        self.positions = list(start.positions)  # [num_streams]; only this rank's entries move
        self.epoch = start.epoch  # epoch of the last trained batch
        self.rank_streams = rank_streams
        self.steps_per_epoch = steps_per_epoch

    def advance(self, batch: Batch) -> None:
        for stream, position in batch.positions.items():
            self.positions[stream] = position
        self.epoch = batch.epoch

    def global_state(self, epoch: int, next_step_in_epoch: int, info: DistInfo) -> DataState:
        """The whole run's data position before step `next_step_in_epoch` of `epoch`. A collective (all-reduce)
        within an epoch; at the end of an epoch every stream starts the next one at 0 and nothing is exchanged."""
        num_streams = len(self.positions)
        if next_step_in_epoch >= self.steps_per_epoch:
            return DataState(epoch=epoch + 1, step_in_epoch=0, positions=[0] * num_streams)
        mine = torch.zeros(num_streams, dtype=torch.long)
        for stream in self.rank_streams:
            mine[stream] = self.positions[stream]
        all_reduce_(mine, info)  # every stream belongs to exactly one rank: the sum is the full vector
        return DataState(epoch=epoch, step_in_epoch=next_step_in_epoch, positions=[int(p) for p in mine.tolist()])
