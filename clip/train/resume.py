"""Start or resume: pick the checkpoint to continue from, check that it belongs to this run, restore the state.

Guarantees (docs/formats.md "Checkpoints"):
- the newest loadable checkpoint in `train.output` is picked (highest step, final.pt on a tie;
  clip.train.checkpoint.latest_checkpoint), so a run started again with the same command resumes by itself;
- a checkpoint of another `train.model` / `train.model_overrides`, of another data version, or beyond this run's
  step count is refused (ValueError naming the checkpoint, the key and both values) before anything is written;
  another stream count is refused when the data position is restored (`DataState.from_dict`, DataError);
- a resumed run continues with the checkpoint's model config and weights, optimizer, LR schedule, RNG states and
  data position, so it trains on the same samples to the same weights as a run that never stopped;
- a fresh run builds `train.model` with `train.model_overrides`, the vocabulary and context length defaulting to
  the tokenizer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clip import storage as storage_lib
from clip.config import StorageConfig, TrainConfig
from clip.tokenizer import Tokenizer
from clip.train.checkpoint import FINAL_NAME, latest_checkpoint, set_rng_state
from clip.train.distributed import DistInfo
from clip.train.schedule import Schedule, WarmupCosine
from clip.train.state import TrainState, load_optimizer_state
from clip.train.streams import DataState
from clip.train.wrap import wrap_model


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from (`uri` and `checkpoint` None: a fresh start at step 0)."""

    uri: str | None
    checkpoint: dict[str, Any] | None
    is_final: bool  # the checkpoint is train.output's final.pt (the end of an earlier run)

    @property
    def start_step(self) -> int:
        return int(self.checkpoint["step"]) if self.checkpoint is not None else 0


def find_resume_point(tcfg: TrainConfig, storage: StorageConfig, data_version: str,
                      schedule: Schedule) -> ResumePoint:
    """The newest checkpoint in `train.output`, checked against this run; a fresh start when there is none."""
    found = latest_checkpoint(tcfg.output, storage)
    if found is None:
        return ResumePoint(None, None, is_final=False)
    uri, checkpoint = found
    # A resume rebuilds the checkpoint's model: a different model asked for would be silently ignored.
    asked, saved = tcfg.model_dump(mode="json"), checkpoint.get("train_config") or {}
    for key in ("model", "model_overrides"):
        if key in saved and saved[key] != asked[key]:
            raise ValueError(
                f"{uri} was trained with train.{key}={saved[key]!r} but this run asks for "
                f"{asked[key]!r}; use a new train.output, or the same train.{key} to resume"
            )
    if checkpoint.get("data_version") not in (None, data_version):
        # Its data position and schedule belong to other data; carrying on (or reporting its finished run as
        # this one) would silently skip training on the new data version.
        raise ValueError(
            f"{uri} was trained on data version {str(checkpoint['data_version'])[:12]}, but {tcfg.data} now "
            f"holds version {data_version[:12]}; use a new train.output to train on the new data"
        )
    if int(checkpoint.get("step", 0)) > schedule.total_steps:
        raise ValueError(
            f"{uri} is at step {checkpoint['step']}, beyond this run's {schedule.total_steps} steps; "
            "use a new train.output or more train.epochs"
        )
    return ResumePoint(uri, checkpoint, is_final=uri == storage_lib.join(tcfg.output, FINAL_NAME))


def resume_or_start(tcfg: TrainConfig, info: DistInfo, point: ResumePoint, tokenizer: Tokenizer,
                    schedule: Schedule, data_version: str) -> TrainState:
    """Build the model (the checkpoint's config and weights, or a fresh `train.model`), wrap it for this world
    (clip/train/wrap.py), build AdamW and the warm-up/cosine schedule, and restore the checkpoint's optimizer,
    scheduler, RNG and data position. Collective with the other ranks when wrapping for DDP / FSDP."""
    from clip.model import create_model, create_model_from_config
    from clip.optim import build_optimizer

    checkpoint = point.checkpoint
    if checkpoint is not None:
        model = create_model_from_config(checkpoint["model_config"])
    else:
        overrides = dict(tcfg.model_overrides)
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("context_length", tokenizer.context_length)
        model = create_model(tcfg.model, **overrides)
    model_config = model.config.to_dict()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # into the bare module, before any wrapper shards it
    wrapped = wrap_model(model, info, grad_checkpointing=tcfg.grad_checkpointing, fsdp=tcfg.fsdp,
                         compile_model=tcfg.compile)
    optimizer = build_optimizer(wrapped.module, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    if wrapped.kind == "fsdp":
        for group in optimizer.param_groups:
            group["foreach"] = False  # groups mix sharded DTensors and the replicated scalar
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(tcfg.warmup_steps, schedule.total_steps))
    if checkpoint is not None:
        load_optimizer_state(wrapped, optimizer, checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
    data_state = DataState.from_dict(checkpoint.get("data_state") if checkpoint else None, schedule.num_streams)
    return TrainState(
        wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, tokenizer=tokenizer, model_config=model_config,
        train_config=tcfg.model_dump(mode="json"), data_version=data_version, start_step=point.start_step,
        data_state=data_state,
    )
