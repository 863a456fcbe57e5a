"""The training stage: what every process runs (one process, or each rank under torchrun / srun).

    from clip.train import stage
    result = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                       progress=progress, debug=cfg.debug)
    result.checkpoint, result.tokenizer, result.metrics["final_loss"]

A run: the data version (rank 0 reads `train.data`'s `latest.json` pointer once and tells the other ranks) and
its manifest (clip/train/streams.py) -> the step schedule (schedule.py) -> the checkpoint to resume from,
checked (resume.py) -> the tokenizer (tokenizer_setup.py) -> the model, wrapped, with its optimizer and restored
state (resume.py, wrap.py) -> per step: this rank's part of the global batch (loader.py), one step (step.py), the
metric window (report.py), the debug hooks (debug.py), a checkpoint every `train.checkpoint_every` steps
(state.py) -> final.pt, tokenizer.json, metrics.json, MLflow (report.py).

Guarantees: the same config and data give the same samples per step, the same checkpoints and the same weights
whether the run went through in one go or was stopped and started again (any number of times, on any world size
with the same `train.streams`); a finished run started again trains nothing and reports what it wrote. Progress
goes through the progress protocol (clip.progress), from rank 0 only: task "train", done = step, total = the
run's steps, detail "loss 1.432" (the loss of the last logging step).

A step that is neither a logging step (`train.log_every`, the last step) nor a checkpoint step reads nothing back
from the device (with a fused AdamW, clip/train/step.py): the loss sums, the non-finite counts and the last loss
stay on the device and are read at logging steps; the `train.max_nonfinite_steps` stop is decided at logging and
checkpoint steps. `train.accum_steps` changes neither the samples of a step nor the step count, so the data
position and a resume are the same with or without accumulation.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from typing import Any

import numpy as np
import torch

from clip import storage as storage_lib
from clip.config import ComputeConfig, DebugConfig, StorageConfig, TrackingConfig, TrainConfig
from clip.formats.checkpoint import default_run_location
from clip.progress import Progress
from clip.tracking import Tracker
from clip.train.checkpoint import FINAL_NAME, prune_checkpoints, step_name
from clip.train.debug import DebugHooks
from clip.train.distributed import DistInfo, all_reduce_, barrier, broadcast_object, cleanup, init_distributed
from clip.train.loader import RankLoader, StreamConfig
from clip.train.monitor import EpochMonitor, check_set_names
from clip.train.report import (
    NOTHING_TO_TRAIN_TAG,
    LogWindow,
    LossCurve,
    TrainResult,
    load_result,
    segment_tags,
    write_run_outputs,
)
from clip.train.resume import find_resume_point, resume_or_start
from clip.train.schedule import plan_schedule
from clip.train.state import DataPosition, save_training_state
from clip.train.step import NonFiniteGuard, NonFiniteLossError, device_inputs, mark_tokens_checked, train_step
from clip.train.stop import StopSignals, TrainingStopped
from clip.train.streams import StreamPlan, read_manifest, resolve_data_location
from clip.train.tokenizer_setup import setup_tokenizer
from clip.train.wrap import check_fsdp_world

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingStopped", "run"]

PROGRESS_TASK = "train"


def run(
    cfg: TrainConfig, *, storage: StorageConfig, compute: ComputeConfig, tracking: TrackingConfig | None = None,
    progress: Progress | None = None, debug: DebugConfig | None = None,
) -> TrainResult:
    """Run (or resume) training in this process; collective with the other ranks when under a launcher.

    `compute.device` picks the device (the launcher options in `compute` are pipelines/train.py's business);
    `tracking` None: no MLflow; `debug` None: no debug aids."""
    # SIGUSR1 / SIGTERM: a checkpoint, then TrainingStopped (clip/train/stop.py); the handlers are in place before
    # the DataLoader workers fork, which inherit them, and until the process group is gone.
    with StopSignals() as stop:
        info = init_distributed(compute.device)
        try:
            return _run(cfg, storage, compute, tracking or TrackingConfig(enabled=False), debug or DebugConfig(),
                        info, progress if info.is_main else None, stop)
        finally:
            cleanup(info)


def run_location(cfg: TrainConfig, storage: StorageConfig) -> str:
    """Where this run writes: `train.output`, or when unset the folder of (model, data version) the manifest at
    `train.data` names (through its pointer; `pin_data_version` first to keep that choice fixed)."""
    if cfg.output is not None:
        return cfg.output
    return default_run_location(cfg.model, read_manifest(cfg.data, storage).data_version, loss=cfg.loss)


def pin_data_version(cfg: TrainConfig, storage: StorageConfig) -> TrainConfig:
    """`cfg` with `train.data` resolved to the version folder its `latest.json` names now (unchanged when it
    already names a version folder), so that a launcher, its restarted workers and its result all see the same
    data version whatever is published meanwhile."""
    return cfg.model_copy(update={"data": resolve_data_location(cfg.data, storage)})


def build_loss(cfg: TrainConfig, *, equal_batches: bool) -> torch.nn.Module:
    """The loss of `train.loss` (the contract in clip/loss.py): clip -> ClipLoss (`train.local_loss`), siglip ->
    SigLipLoss. `equal_batches`: every rank holds the same number of rows (no size exchange, no host sync)."""
    if cfg.loss == "siglip":
        from clip.sigmoid_loss import SigLipLoss

        return SigLipLoss()
    from clip.loss import ClipLoss

    return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=True, equal_batches=equal_batches)


def _run(cfg: TrainConfig, storage: StorageConfig, compute: ComputeConfig, tracking: TrackingConfig,
         debug: DebugConfig, info: DistInfo, progress: Progress | None, stop: StopSignals) -> TrainResult:
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
    tracker = Tracker(tracking, active=info.is_main)
    params_for_tracking = {"train": cfg.model_dump(mode="json"), "compute": compute.model_dump(mode="json"),
                           "world_size": info.world_size, "total_steps": schedule.total_steps}
    # this invocation's own MLflow run, never an earlier segment's reopened: its params are the ones it ran with
    run_tags = segment_tags(cfg.output, manifest.data_version, manifest.location, point.start_step, point.metadata)
    if point.is_final and point.start_step == schedule.total_steps:
        finished = load_result(cfg.output, storage)
        if finished is not None:  # a finished run started again: nothing to train; report what it wrote
            with tracker.run("train", params=params_for_tracking, tags={**run_tags, NOTHING_TO_TRAIN_TAG: "true"}):
                return finished
    tokenizer = setup_tokenizer(cfg, storage, info, manifest, point.checkpoint)
    state = resume_or_start(cfg, info, point, tokenizer, schedule, manifest.data_version)
    gpu_decode = cfg.gpu_decode and info.device.type == "cuda"
    # gpu_decode can drop undecodable rows, so ranks may then hold different batch sizes: only that path pays for
    # the loss's size exchange (one host sync per step); otherwise every rank holds batch_size / world_size rows.
    loss_fn = build_loss(cfg, equal_batches=not gpu_decode)
    # siglip and local_loss return each rank's share of the global loss (their mean over ranks is the loss)
    per_rank_share = info.distributed and (cfg.loss == "siglip" or cfg.local_loss)
    # Token ids checked and padding trimmed on the host (device_inputs) so that encode_text needs no host sync;
    # not trimmed under torch.compile, whose graphs keep the full static length.
    mark_tokens_checked(state.wrapped)
    vocab_size = int(state.model_config["text"]["vocab_size"])
    trim_text = not cfg.compile and bool(getattr(state.wrapped.module, "trim_text_padding", False))

    per_rank = schedule.num_streams // info.world_size
    rank_streams = tuple(range(info.rank * per_rank, (info.rank + 1) * per_rank))
    stream_cfg = StreamConfig(
        plan=StreamPlan(manifest.shards, schedule.num_streams, cfg.seed, cfg.resampled, manifest.data_version),
        chunk=schedule.chunk,
        steps_per_epoch=schedule.steps_per_epoch, epochs=cfg.epochs, shuffle_buffer=cfg.shuffle_buffer,
        image_size=state.image_size, tokenizer_json=tokenizer.to_json(), rank_streams=rank_streams,
        start=state.data_state, gpu_decode=gpu_decode,
        storage_cfg=storage.model_dump(),
    )
    position = DataPosition(state.data_state, rank_streams, schedule.steps_per_epoch)
    hooks = DebugHooks(debug, info.rank)
    hooks.log_start(state.start_step)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, cfg.output)
    counters = {"corrupt_samples": 0, "truncated_shards": 0}
    window = LogWindow()
    curve = LossCurve().resume(cfg.output, storage, state.start_step) if info.is_main else LossCurve()
    # The per-epoch learning curve: mean loss and zero-shot top-1 on train.zeroshot_sets after every epoch.
    epoch_curve = LossCurve.epoch_curve(cfg.zeroshot_sets)
    if info.is_main:
        epoch_curve.resume(cfg.output, storage, state.start_step)
    monitor = EpochMonitor(cfg.zeroshot_sets, image_size=state.image_size, tokenizer=tokenizer,
                           device=info.device) if cfg.zeroshot_sets else None
    epoch_window = LogWindow()  # the epoch's losses (a resumed epoch: those since the resume)
    total_wait, loop_start = 0.0, time.monotonic()
    last_loss = float("nan")  # host copy of the newest finite loss, read at logging steps
    last_loss_on_device = torch.full((), float("nan"), device=info.device)  # [] the newest finite loss
    checkpoint_due = False  # a checkpoint step fell inside a non-finite streak: write at the next finite step
    step = state.start_step

    # A non-finite step skips optimizer.step() but not scheduler.step() (the step is spent): expected, not a bug.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    batches: Any = (batch for batch in ())  # a generator either way, so closing() below can stop the workers
    if state.start_step < schedule.total_steps:
        # Fork the DataLoader workers before this function starts threads (MLflow's asynchronous metric logging):
        # a fork copies the locks such threads may hold, never the threads that would release them.
        batches = RankLoader(stream_cfg, cfg.num_workers, pin_memory=info.device.type == "cuda").start()
    if progress is not None:
        progress(PROGRESS_TASK, state.start_step, schedule.total_steps)
    with tracker.run("train", params=params_for_tracking, tags=run_tags), \
            contextlib.closing(batches):  # loader workers stop with the loop, on errors too
        state.mlflow_run_id = tracker.run_id
        state.wrapped.forward_module.train()
        wait_start = time.monotonic()
        for batch in batches:
            waited = time.monotonic() - wait_start
            window.wait_s += waited
            total_wait += waited
            step = batch.epoch * schedule.steps_per_epoch + batch.step_in_epoch + 1
            images, tokens, failed_decodes = device_inputs(batch, state.image_size, info.device,
                                                           vocab_size=vocab_size, trim_text=trim_text)
            counters["corrupt_samples"] += batch.corrupt + failed_decodes
            counters["truncated_shards"] += batch.truncated
            # No host sync from here to the logging block: the outcome, the guard's counts and the window's sums
            # stay on the device until a logging or checkpoint step reads them.
            outcome = train_step(state, loss_fn, images, tokens, info, use_bf16=use_bf16,
                                 poison=hooks.poisons(step), accum_steps=cfg.accum_steps)
            guard.record(outcome.finite_flag)
            window.add(outcome.finite_flag, outcome.loss_value)
            epoch_window.add(outcome.finite_flag, outcome.loss_value)
            last_loss_on_device = torch.where(outcome.finite_flag, outcome.loss_value, last_loss_on_device)
            position.advance(batch)
            hooks.log_step(step, batch.keys)

            log_due = step % cfg.log_every == 0 or step == schedule.total_steps
            checkpoint_due = checkpoint_due or step % cfg.checkpoint_every == 0
            if log_due or checkpoint_due:
                # A streak that reached train.max_nonfinite_steps stops the run here: at most log_every - 1 (or
                # checkpoint_every - 1) steps after it reached the limit.
                guard.check(step)
            if log_due:
                if per_rank_share and window.loss_sum is not None:
                    # siglip / local_loss: each rank's value is its share, and the global loss is their mean
                    # (a collective at a logging step, which every rank reaches at the same step)
                    shared = torch.stack([window.loss_sum, last_loss_on_device.float()])
                    all_reduce_(shared, info)
                    window.loss_sum, last_loss_on_device = shared[0] / info.world_size, shared[1] / info.world_size
                last_loss = float(last_loss_on_device)
                logged = window.metrics(
                    lr=state.scheduler.get_last_lr()[0], logit_scale=float(outcome.logit_scale),
                    batch_size=cfg.batch_size, device=info.device, corrupt_samples=counters["corrupt_samples"],
                    nonfinite_steps=guard.total)
                tracker.log_metrics(logged, step=step)
                curve.add(step, logged)
                window = LogWindow()
            if step % schedule.steps_per_epoch == 0:  # an epoch ends: its mean loss and zero-shot accuracies
                if per_rank_share and epoch_window.loss_sum is not None:  # as for the log window above
                    all_reduce_(epoch_window.loss_sum, info)
                    epoch_window.loss_sum = epoch_window.loss_sum / info.world_size
                epoch, epoch_loss = step // schedule.steps_per_epoch, epoch_window.mean_loss()
                accuracies = monitor.accuracies(state.wrapped.module) if monitor else {}
                tracker.log_metrics({"epoch": epoch, "epoch_loss": epoch_loss,
                                     **{f"zeroshot/{name}": value for name, value in accuracies.items()}}, step=step)
                epoch_curve.add(step, {"epoch": epoch, "loss": epoch_loss, **accuracies})
                epoch_window = LogWindow()
            if progress is not None:  # the loss of the last logging step: reading it every step would sync
                detail = f"loss {last_loss:.3f}" if math.isfinite(last_loss) else ""
                progress(PROGRESS_TASK, step, schedule.total_steps, detail)
            # A stop signal is acted on where the host reads the device anyway; all ranks agree (collective).
            stop_due = (log_due or checkpoint_due) and step < schedule.total_steps and stop.agreed(info)
            # never mid-streak (a stop then waits for the next finite logging or checkpoint step)
            if (checkpoint_due or stop_due) and guard.in_a_row == 0 and step < schedule.total_steps:
                checkpoint_due = False
                data_state = position.global_state(batch.epoch, batch.step_in_epoch + 1, info)
                step_uri = storage_lib.join(cfg.output, step_name(step))
                if save_training_state(state, step_uri, step, data_state, info, storage):
                    prune_checkpoints(cfg.output, cfg.keep_checkpoints, storage)
                if info.is_main:
                    curve.write(cfg.output, storage)
                    epoch_curve.write(cfg.output, storage)
                barrier(info)
                if stop_due:
                    raise TrainingStopped(step, step_uri, stop.signal_name)
            if step >= schedule.total_steps:
                break
            hooks.after_step()
            wait_start = time.monotonic()
        del batches  # stops the workers

        # totals over ranks, for metrics
        totals = torch.tensor([counters["corrupt_samples"], counters["truncated_shards"]], dtype=torch.long)
        all_reduce_(totals, info)
        elapsed_loop = max(1e-9, time.monotonic() - loop_start)
        trained_steps = step - state.start_step
        final_uri = storage_lib.join(cfg.output, FINAL_NAME)
        if trained_steps > 0 or not point.is_final:
            data_state = position.global_state(position.epoch, schedule.steps_per_epoch, info)
            save_training_state(state, final_uri, step, data_state, info, storage)
        metrics = {
            "steps": step,
            "trained_steps_this_run": trained_steps,
            "resumed_from_step": state.start_step,
            "total_steps": schedule.total_steps,
            "samples_seen": step * cfg.batch_size,
            "final_loss": last_loss,
            "corrupt_samples": int(totals[0]),
            "truncated_shards": int(totals[1]),
            "nonfinite_steps": guard.total,
            "samples_per_s": trained_steps * cfg.batch_size / elapsed_loop,
            "data_wait_fraction": min(1.0, total_wait / elapsed_loop),
            "elapsed_s": time.monotonic() - started,
            "world_size": info.world_size,
            "data_version": manifest.data_version,
            "checkpoint": final_uri,
        }
        if info.is_main:
            curve.write(cfg.output, storage)
            epoch_curve.write(cfg.output, storage)
            write_run_outputs(tracker, cfg.output, storage, tokenizer, metrics, step)
        barrier(info)
    return TrainResult.from_metrics(metrics, cfg.output)
