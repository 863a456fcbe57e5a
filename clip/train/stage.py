"""The training stage: what every process runs (one process, or each rank under torchrun / srun).

    from clip.train import stage
    result = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                       progress=progress, debug=cfg.debug)
    result.checkpoint, result.tokenizer, result.metrics["final_loss"]

A run is set up once (clip/train/prepare.py: data version and manifest, schedule, resume point, tokenizer, the
wrapped model with its optimizer and restored state, the loss, this rank's streams), then loops. Per step: this
rank's part of the global batch (loader.py), one step (step.py), its record on the device and the metrics of
logging steps (steplog.py), the debug hooks (debug.py), a checkpoint when one is due (checkpointer.py); at the
end final.pt, tokenizer.json, metrics.json and MLflow.

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
import warnings
from typing import Any

from clip.config import ComputeConfig, DebugConfig, StorageConfig, TrackingConfig, TrainConfig
from clip.formats.checkpoint import default_run_location
from clip.progress import Progress
from clip.tracking import Tracker
from clip.train.checkpointer import Checkpointer
from clip.train.debug import DebugHooks
from clip.train.distributed import barrier, cleanup, init_distributed
from clip.train.loader import RankLoader
from clip.train.prepare import PreparedRun, prepare_run
from clip.train.report import NOTHING_TO_TRAIN_TAG, TrainResult
from clip.train.state import DataPosition
from clip.train.step import NonFiniteGuard, NonFiniteLossError, device_inputs, train_step
from clip.train.steplog import StepLog
from clip.train.stop import StopSignals, TrainingStopped
from clip.train.streams import read_manifest, resolve_data_location

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingStopped", "run"]


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
            prepared = prepare_run(cfg, storage=storage, compute=compute, info=info)
            tracker = Tracker(tracking or TrackingConfig(enabled=False), active=info.is_main)
            if isinstance(prepared, PreparedRun):
                return _train(prepared, tracker, debug or DebugConfig(), progress if info.is_main else None, stop)
            # a finished run started again: nothing to train; report what it wrote
            with tracker.run("train", params=prepared.tracking_params,
                             tags={**prepared.run_tags, NOTHING_TO_TRAIN_TAG: "true"}):
                return prepared.finished  # type: ignore[return-value]  # set when not a PreparedRun
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


def _train(run: PreparedRun, tracker: Tracker, debug: DebugConfig, progress: Progress | None,
           stop: StopSignals) -> TrainResult:
    """The loop: forward, backward, step; the StepLog decides when to log, the Checkpointer when to save."""
    cfg, info, state, total_steps = run.cfg, run.info, run.state, run.schedule.total_steps
    position = DataPosition(state.data_state, run.stream_cfg.rank_streams, run.schedule.steps_per_epoch)
    hooks = DebugHooks(debug, info.rank)
    hooks.log_start(state.start_step)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, cfg.output)
    log = StepLog(run, tracker, guard, progress)
    checkpointer = Checkpointer(run, position, guard, stop, with_each=log.write_curves)
    step = state.start_step
    # A non-finite step skips optimizer.step() but not scheduler.step() (the step is spent): expected, not a bug.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    batches: Any = (batch for batch in ())  # a generator either way, so closing() below can stop the workers
    if state.start_step < total_steps:
        # Fork the DataLoader workers before this function starts threads (MLflow's asynchronous metric logging):
        # a fork copies the locks such threads may hold, never the threads that would release them.
        batches = RankLoader(run.stream_cfg, cfg.num_workers, pin_memory=info.device.type == "cuda").start()
    log.begin()
    with tracker.run("train", params=run.tracking_params, tags=run.run_tags), \
            contextlib.closing(batches):  # loader workers stop with the loop, on errors too
        state.mlflow_run_id = tracker.run_id
        state.wrapped.forward_module.train()
        log.waiting()
        for batch in batches:
            step = log.arrived(batch)
            images, tokens, failed_decodes = device_inputs(batch, state.image_size, info.device,
                                                           vocab_size=run.vocab_size, trim_text=run.trim_text)
            # No host sync from here to the logging block: the outcome, the guard's counts and the log's sums
            # stay on the device until a logging or checkpoint step reads them.
            outcome = train_step(state, run.loss_fn, images, tokens, info, use_bf16=run.use_bf16,
                                 poison=hooks.poisons(step), accum_steps=cfg.accum_steps)
            guard.record(outcome.finite_flag)
            log.record(outcome, failed_decodes)
            position.advance(batch)
            hooks.log_step(step, batch.keys)

            log_due, checkpoint_due = log.due(step), checkpointer.due(step)
            if log_due or checkpoint_due:
                # A streak that reached train.max_nonfinite_steps stops the run here: at most log_every - 1 (or
                # checkpoint_every - 1) steps after it reached the limit.
                guard.check(step)
            log.after_step(step, outcome, log_due=log_due)
            checkpointer.after_step(step, batch, sync=log_due or checkpoint_due)
            if step >= total_steps:
                break
            hooks.after_step()
            log.waiting()
        log.end_loop()
        metrics = log.finish(step, checkpoint=checkpointer.save_final(step))
        barrier(info)
    return TrainResult.from_metrics(metrics, cfg.output)
