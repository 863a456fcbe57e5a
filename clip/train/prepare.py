"""A training run before its first step, decided once per process:

    run = prepare_run(cfg, storage=storage, compute=compute, info=info)
    isinstance(run, PreparedRun)   # False: a finished run started again, only its RunPlan (`run.finished`)

First the plan (`RunPlan`): the model name, FSDP world and per-epoch sets checked (before any work), the seeds
set, the data version (rank 0 reads `train.data`'s `latest.json` pointer once and tells the other ranks) and its
manifest, the run folder (`train.output`, or the folder of (model, data version)), the step schedule, the
checkpoint to resume from, checked (clip/train/resume.py), this segment's MLflow params and tags, and for a
finished run started again the result it wrote (then nothing more is read: no checkpoint whole). Then what the run
trains with (`PreparedRun`): the tokenizer, the model wrapped with its optimizer and restored state, the loss,
this rank's stream config and the flags the loop reads (bf16, per-rank loss share, token checks).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from clip.config import ComputeConfig, StorageConfig, TrainConfig
from clip.formats.checkpoint import default_run_location
from clip.formats.manifest import Manifest
from clip.tokenizer import Tokenizer
from clip.train.distributed import DistInfo, broadcast_object
from clip.train.loader import StreamConfig
from clip.train.monitor import check_set_names
from clip.train.report import TrainResult, load_result, segment_tags
from clip.train.resume import ResumePoint, find_resume_point, resume_or_start
from clip.train.schedule import Schedule, plan_schedule
from clip.train.state import TrainState
from clip.train.step import mark_tokens_checked
from clip.train.streams import StreamPlan, read_manifest, resolve_data_location
from clip.train.tokenizer_setup import setup_tokenizer
from clip.train.wrap import check_fsdp_world, uses_bf16


@dataclass(frozen=True)
class RunPlan:
    """What this run is: its config (with `train.output` resolved), data, schedule and resume point."""

    cfg: TrainConfig
    storage: StorageConfig
    info: DistInfo
    manifest: Manifest  # the data version trained on
    schedule: Schedule
    point: ResumePoint
    tracking_params: dict[str, Any]  # this segment's MLflow params: the config it ran with
    run_tags: dict[str, str | None]  # this segment's MLflow tags (report.segment_tags)
    started: float  # time.monotonic() when the run began
    finished: TrainResult | None  # a finished run started again: what it wrote (nothing to train)


@dataclass(frozen=True)
class PreparedRun(RunPlan):
    """A run ready for its first step: the plan and what it trains with."""

    tokenizer: Tokenizer
    state: TrainState
    loss_fn: torch.nn.Module
    stream_cfg: StreamConfig  # this rank's streams and where they start
    use_bf16: bool  # the towers in bf16 (wrap.uses_bf16)
    per_rank_share: bool  # the loss of each rank is its share: the global loss is the mean over ranks
    vocab_size: int  # token ids are checked against it on the host (step.device_inputs)
    trim_text: bool  # padding trimmed on the host (not under torch.compile: its graphs keep the full length)


def build_loss(cfg: TrainConfig, *, equal_batches: bool) -> torch.nn.Module:
    """The loss of `train.loss` (the contract in clip/loss.py): clip -> ClipLoss (`train.local_loss`), siglip ->
    SigLipLoss. `equal_batches`: every rank holds the same number of rows (no size exchange, no host sync)."""
    if cfg.loss == "siglip":
        from clip.sigmoid_loss import SigLipLoss

        return SigLipLoss()
    from clip.loss import ClipLoss

    return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=True, equal_batches=equal_batches)


def prepare_run(cfg: TrainConfig, *, storage: StorageConfig, compute: ComputeConfig, info: DistInfo) -> RunPlan:
    """The run ready for its first step (a PreparedRun), or for a finished run started again its RunPlan alone.
    Collective under a launcher: rank 0 chooses the data version and the checkpoint; a learnt tokenizer and the
    wrapping are collectives too."""
    plan = _plan(cfg, storage=storage, compute=compute, info=info)
    return plan if plan.finished is not None else _build(plan)


def _plan(cfg: TrainConfig, *, storage: StorageConfig, compute: ComputeConfig, info: DistInfo) -> RunPlan:
    from clip.model import get_config

    get_config(cfg.model, **cfg.model_overrides)  # an unknown model name is refused before any work starts
    check_fsdp_world(cfg.fsdp, info.world_size)  # FSDP on one process: refused, also before any work
    check_set_names(cfg.zeroshot_sets)  # an unknown per-epoch set: refused, also before any work
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    # The pointer is read once, by rank 0; every rank then reads only inside that version's folder, which no
    # later publish rewrites (a new version published mid-run is trained on by the next run, not this one).
    data_location = str(broadcast_object(resolve_data_location(cfg.data, storage) if info.is_main else None, info))
    manifest = read_manifest(data_location, storage)
    if cfg.output is None:  # the run of this model on this data version: new data, new run; same data, resume
        cfg = cfg.model_copy(update={"output": default_run_location(cfg.model, manifest.data_version,
                                                                      loss=cfg.loss)})
    schedule = plan_schedule(cfg, sum(s.samples for s in manifest.shards), info.world_size)
    point = find_resume_point(cfg, storage, manifest.data_version, schedule, info)
    params = {"train": cfg.model_dump(mode="json"), "compute": compute.model_dump(mode="json"),
              "world_size": info.world_size, "total_steps": schedule.total_steps}
    # this invocation's own MLflow run, never an earlier segment's reopened: its params are the ones it ran with
    tags = segment_tags(cfg.output, manifest.data_version, manifest.location, point.start_step, point.metadata)
    finished = None
    if point.is_final and point.start_step == schedule.total_steps:
        finished = load_result(cfg.output, storage)
    return RunPlan(cfg=cfg, storage=storage, info=info, manifest=manifest, schedule=schedule, point=point,
                   tracking_params=params, run_tags=tags, started=started, finished=finished)


def _build(plan: RunPlan) -> PreparedRun:
    """The tokenizer, the state (model, optimizer, schedule; restored when resuming), the loss and this rank's
    streams."""
    cfg, info, schedule, manifest = plan.cfg, plan.info, plan.schedule, plan.manifest
    tokenizer = setup_tokenizer(cfg, plan.storage, info, manifest, plan.point.checkpoint)
    state = resume_or_start(cfg, info, plan.point, tokenizer, schedule, manifest.data_version)
    gpu_decode = cfg.gpu_decode and info.device.type == "cuda"
    # gpu_decode can drop undecodable rows, so ranks may then hold different batch sizes: only that path pays for
    # the loss's size exchange (one host sync per step); otherwise every rank holds batch_size / world_size rows.
    loss_fn = build_loss(cfg, equal_batches=not gpu_decode)
    # Token ids checked and padding trimmed on the host (device_inputs) so that encode_text needs no host sync.
    mark_tokens_checked(state.wrapped)
    per_rank = schedule.num_streams // info.world_size
    stream_cfg = StreamConfig(
        plan=StreamPlan(manifest.shards, schedule.num_streams, cfg.seed, cfg.resampled, manifest.data_version),
        chunk=schedule.chunk,
        steps_per_epoch=schedule.steps_per_epoch, epochs=cfg.epochs, shuffle_buffer=cfg.shuffle_buffer,
        image_size=state.image_size, tokenizer_json=tokenizer.to_json(),
        rank_streams=tuple(range(info.rank * per_rank, (info.rank + 1) * per_rank)),
        start=state.data_state, gpu_decode=gpu_decode,
        storage_cfg=plan.storage.model_dump(),
    )
    return PreparedRun(
        **{field.name: getattr(plan, field.name) for field in fields(RunPlan)},
        tokenizer=tokenizer, state=state, loss_fn=loss_fn, stream_cfg=stream_cfg,
        use_bf16=uses_bf16(cfg.precision, info.device),
        # siglip and local_loss return each rank's share of the global loss (their mean over ranks is the loss)
        per_rank_share=info.distributed and (cfg.loss == "siglip" or cfg.local_loss),
        vocab_size=int(state.model_config["text"]["vocab_size"]),
        trim_text=not cfg.compile and bool(getattr(state.wrapped.module, "trim_text_padding", False)),
    )
