"""Start or resume: pick the checkpoint to continue from, check that it belongs to this run, restore the state.

Guarantees (docs/formats.md "Checkpoints"):
- the newest good checkpoint in `train.output` is picked (highest step, final.pt on a tie;
  clip.train.checkpoint.find_latest), so a run started again with the same command resumes by itself. The one
  picked is read whole by rank 0 and checked (against its sidecar's sha256 and the checksum stored inside it)
  before anything else: a damaged one (a flipped byte, a truncated write) is passed over for the one before it,
  with a warning naming both, so an unattended run carries on from the last good state. Temp files of writes a
  kill interrupted (clip.storage's `.<name>.tmp-<hex>`) are removed from a local `train.output` first;
- a checkpoint of another `train.model` / `train.model_overrides` / `train.loss`, of another data version, or
  beyond this run's step count is refused (ValueError naming the checkpoint, the key and both values) before anything is written;
  so is one of another `train.seed` / `train.shuffle_buffer` / `train.batch_size` (they map the saved data
  positions to samples: a change would silently re-map them);
  another stream count is refused when the data position is restored (`DataState.from_dict`, DataError);
- under a launcher rank 0 alone picks the checkpoint and broadcasts its URI and metadata (step, data version,
  data_state, train_config, mlflow_run_id...), so the ranks never disagree; the choice and every check below use
  that metadata alone, read from the checkpoints' sidecars where they have one (clip.train.checkpoint
  `find_latest`): only rank 0 reads the chosen checkpoint whole to choose it (the integrity check above), the
  others read it once when its weights or tokenizer are needed (`ResumePoint.checkpoint`), and a finished run
  started again reads none;
- a resumed run continues with the checkpoint's model config and weights, optimizer, step count, RNG states and
  data position, so it trains on the same samples to the same weights as a run that never stopped; the LR
  schedule is rebuilt from this run's config (only the step count is restored), so a finished run continued
  with more `train.epochs` keeps learning instead of staying at the old schedule's end (LR 0);
- a fresh run builds `train.model` with `train.model_overrides`, the vocabulary and context length defaulting to
  the tokenizer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from clip import storage as storage_lib
from clip.config import StorageConfig, TrainConfig
from clip.tokenizer import Tokenizer
from clip.train.checkpoint import (
    FINAL_NAME,
    FoundCheckpoint,
    find_latest,
    remove_stale_temp_files,
    set_rng_state,
)
from clip.train.distributed import DistInfo, broadcast_object
from clip.train.schedule import Schedule, WarmupCosine
from clip.train.state import TrainState, load_optimizer_state
from clip.train.streams import DataState
from clip.train.wrap import wrap_model


@dataclass
class ResumePoint:
    """The checkpoint a run continues from (`found` None: a fresh start at step 0). Its metadata is at hand;
    the whole checkpoint is read on first use of `checkpoint`."""

    found: FoundCheckpoint | None
    is_final: bool  # the checkpoint is train.output's final.pt (the end of an earlier run)
    storage: StorageConfig | None = None
    _checkpoint: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def uri(self) -> str | None:
        return self.found.uri if self.found is not None else None

    @property
    def metadata(self) -> dict[str, Any] | None:
        """step, samples_seen, data_state, data_version, mlflow_run_id, train_config, model_config (those saved)."""
        return self.found.meta if self.found is not None else None

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """The whole checkpoint dict (read, and checked against its sidecar, on first use)."""
        if self.found is None:
            return None
        if self._checkpoint is None:
            self._checkpoint = self.found.load(self.storage)
        return self._checkpoint

    @property
    def start_step(self) -> int:
        return int(self.found.meta.get("step", 0)) if self.found is not None else 0


# Keys that map a checkpoint's data position (stream positions, step in epoch) to samples.
DATA_MAPPING_KEYS = ("seed", "shuffle_buffer", "batch_size")


def _pick(output: str, storage: StorageConfig, total_steps: int) -> FoundCheckpoint | None:
    """The newest good checkpoint, after removing the temp files of writes a kill interrupted. The one a run will
    load is read whole and checked now (a damaged one is passed over, loudly); a finished run's final.pt, which
    a run started again does not load, is chosen from its sidecar alone."""
    remove_stale_temp_files(output)

    def will_load(found: FoundCheckpoint) -> bool:
        finished = storage_lib.basename(found.uri) == FINAL_NAME and int(found.meta.get("step", 0)) >= total_steps
        return not finished

    return find_latest(output, storage, verify=will_load)


def _choose_checkpoint(output: str, storage: StorageConfig, info: DistInfo | None,
                       total_steps: int) -> FoundCheckpoint | None:
    """`_pick`, by rank 0 alone under a launcher (its URI and metadata broadcast; nothing is read by the others
    to choose)."""
    if info is None or not info.distributed:
        return _pick(output, storage, total_steps)
    if info.is_main:
        try:
            found = _pick(output, storage, total_steps)
        except BaseException as exc:
            broadcast_object(("error", f"{type(exc).__name__}: {exc}"), info)  # the others must not wait forever
            raise
        broadcast_object(("ok", (found.uri, found.meta) if found is not None else None), info)
        return found
    kind, value = broadcast_object(None, info)  # type: ignore[misc]
    if kind == "error":
        raise RuntimeError(f"rank 0 could not choose the checkpoint to resume from in {output}: {value}")
    if value is None:
        return None
    uri, meta = value
    return FoundCheckpoint(uri, meta)


def find_resume_point(tcfg: TrainConfig, storage: StorageConfig, data_version: str,
                      schedule: Schedule, info: DistInfo | None = None) -> ResumePoint:
    """The newest checkpoint in `train.output`, checked against this run; a fresh start when there is none.
    Collective under a launcher when `info` is given (rank 0 chooses, the others follow)."""
    found = _choose_checkpoint(tcfg.output, storage, info, schedule.total_steps)
    if found is None:
        return ResumePoint(None, is_final=False, storage=storage)
    uri, checkpoint = found.uri, found.meta  # the checks below need the metadata only
    # A resume rebuilds the checkpoint's model: a different model asked for would be silently ignored.
    asked, saved = tcfg.model_dump(mode="json"), checkpoint.get("train_config") or {}
    for key in ("model", "model_overrides", "loss"):  # `loss`: a siglip model has a bias parameter a clip one lacks
        if key in saved and saved[key] != asked[key]:
            raise ValueError(
                f"{uri} was trained with train.{key}={saved[key]!r} but this run asks for "
                f"{asked[key]!r}; use a new train.output, or the same train.{key} to resume"
            )
    for key in DATA_MAPPING_KEYS:
        if key in saved and saved[key] != asked[key]:
            raise ValueError(
                f"{uri} was trained with train.{key}={saved[key]!r} but this run asks for {asked[key]!r}; the "
                f"saved data position only means the same samples with the same train.{key}: use "
                f"train.{key}={saved[key]!r} to resume, or a new train.output"
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
    return ResumePoint(found, is_final=uri == storage_lib.join(tcfg.output, FINAL_NAME), storage=storage)


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
        if tcfg.loss == "siglip":  # the paper's start: temperature 10, bias -10 (a learned bias parameter)
            from clip.sigmoid_loss import SIGLIP_INIT

            for name, value in SIGLIP_INIT.items():
                overrides.setdefault(name, value)
        model = create_model(tcfg.model, **overrides)
    model_config = model.config.to_dict()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # into the bare module, before any wrapper shards it
    wrapped = wrap_model(model, info, grad_checkpointing=tcfg.grad_checkpointing, fsdp=tcfg.fsdp,
                         precision=tcfg.precision, compile_model=tcfg.compile)
    optimizer = build_optimizer(wrapped.module, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    if wrapped.kind == "fsdp":
        for group in optimizer.param_groups:
            group["foreach"] = False  # groups mix sharded DTensors and the replicated scalar
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(tcfg.warmup_steps, schedule.total_steps))
    base_lrs = list(scheduler.base_lrs)  # this run's train.lr, not the checkpoint's
    if checkpoint is not None:
        load_optimizer_state(wrapped, optimizer, checkpoint["optimizer"])
        _restore_step_count(scheduler, base_lrs, int(checkpoint["scheduler"]["last_epoch"]))
        set_rng_state(checkpoint["rng"])
    data_state = DataState.from_dict(checkpoint.get("data_state") if checkpoint else None, schedule.num_streams)
    return TrainState(
        wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, tokenizer=tokenizer, model_config=model_config,
        train_config=tcfg.model_dump(mode="json"), data_version=data_version, start_step=point.start_step,
        data_state=data_state,
    )


def _restore_step_count(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float], step: int) -> None:
    """Continue this run's schedule (built from the current config) at `step`: only the step count comes from the
    checkpoint. Loading the saved scheduler state would restore the saved WarmupCosine (its `total`) too, so a
    finished run continued with more epochs would stay at LR 0."""
    scheduler.base_lrs = list(base_lrs)
    scheduler.last_epoch = step
    for group, base, lr_lambda in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * lr_lambda(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
