"""What the training loop reports, and when: per-step sums on the device, metrics every `train.log_every` steps
and at the last step, the per-epoch curve as each epoch ends, progress every step, the final figures at the end.

    log = StepLog(run, tracker, guard, progress)
    step = log.arrived(batch)                      # the wait for the batch, its corrupt / truncated counts
    log.record(outcome, failed_decodes)            # device tensors only: no host read
    log.after_step(step, outcome, log_due=log.due(step))
    log.end_loop()                                 # counts summed over ranks
    metrics = log.finish(step, checkpoint=final_uri)

Guarantees:
- a step that neither logs nor ends an epoch reads nothing back from the device: the loss sums (report.LogWindow)
  and the newest finite loss stay there until a logging step (or, for the epoch's mean, the epoch's end) reads
  them; progress shows the loss of the last logging step;
- siglip and `train.local_loss` runs (`PreparedRun.per_rank_share`) log the mean of the ranks' shares, all-reduced
  at logging steps and epoch ends, which every rank reaches at the same step;
- rank 0 alone writes: MLflow metrics, the loss curves (with every checkpoint, `write_curves`, and at the end),
  metrics.json and tokenizer.json (report.write_run_outputs); the final figures sum the counts of every rank.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from clip.progress import Progress
from clip.tracking import Tracker
from clip.train.distributed import all_reduce_
from clip.train.loader import Batch
from clip.train.monitor import EpochMonitor
from clip.train.prepare import PreparedRun
from clip.train.report import LogWindow, LossCurve, write_run_outputs
from clip.train.step import NonFiniteGuard, StepOutcome

PROGRESS_TASK = "train"


class StepLog:
    """The loop's metrics, curves and progress (see the module doc); `guard` supplies the non-finite counts."""

    def __init__(self, run: PreparedRun, tracker: Tracker, guard: NonFiniteGuard,
                 progress: Progress | None) -> None:
        cfg, info, start_step = run.cfg, run.info, run.state.start_step
        self.run, self.tracker, self.guard, self.progress = run, tracker, guard, progress
        self.corrupt_samples = self.truncated_shards = 0  # this rank's, summed over ranks at the end
        self.window = LogWindow()
        self.epoch_window = LogWindow()  # the epoch's losses (a resumed epoch: those since the resume)
        self.curve = LossCurve().resume(cfg.output, run.storage, start_step) if info.is_main else LossCurve()
        # The per-epoch learning curve: mean loss and zero-shot top-1 on train.zeroshot_sets after every epoch.
        self.epoch_curve = LossCurve.epoch_curve(cfg.zeroshot_sets)
        if info.is_main:
            self.epoch_curve.resume(cfg.output, run.storage, start_step)
        self.monitor = EpochMonitor(cfg.zeroshot_sets, image_size=run.state.image_size, tokenizer=run.tokenizer,
                                    device=info.device) if cfg.zeroshot_sets else None
        self.total_wait, self.loop_start = 0.0, time.monotonic()
        self.wait_start = self.loop_start
        self.elapsed_loop = 0.0
        self.last_loss = float("nan")  # host copy of the newest finite loss, read at logging steps
        self.last_loss_on_device = torch.full((), float("nan"), device=info.device)  # [] the newest finite loss

    def begin(self) -> None:
        """Progress at the step the run starts from."""
        if self.progress is not None:
            self.progress(PROGRESS_TASK, self.run.state.start_step, self.run.schedule.total_steps)

    def waiting(self) -> None:
        """The loop now waits for its next batch."""
        self.wait_start = time.monotonic()

    def arrived(self, batch: Batch) -> int:
        """The batch is here: the wait is counted, and so are the batch's corrupt samples and truncated shards.
        Returns the (1-based) step it is for."""
        waited = time.monotonic() - self.wait_start
        self.window.wait_s += waited
        self.total_wait += waited
        self.corrupt_samples += batch.corrupt
        self.truncated_shards += batch.truncated
        return batch.epoch * self.run.schedule.steps_per_epoch + batch.step_in_epoch + 1

    def record(self, outcome: StepOutcome, failed_decodes: int) -> None:
        """One step's outcome, kept on the device (no host read); `failed_decodes`: images dropped on the GPU."""
        self.corrupt_samples += failed_decodes
        self.window.add(outcome.finite_flag, outcome.loss_value)
        self.epoch_window.add(outcome.finite_flag, outcome.loss_value)
        self.last_loss_on_device = torch.where(outcome.finite_flag, outcome.loss_value, self.last_loss_on_device)

    def due(self, step: int) -> bool:
        """Whether `step` logs: every `train.log_every` steps and the last one."""
        return step % self.run.cfg.log_every == 0 or step == self.run.schedule.total_steps

    def after_step(self, step: int, outcome: StepOutcome, *, log_due: bool) -> None:
        """The metrics of a logging step, the epoch's figures when one ends, and progress."""
        if log_due:
            self._log(step, outcome)
        if step % self.run.schedule.steps_per_epoch == 0:
            self._end_epoch(step)
        if self.progress is not None:  # the loss of the last logging step: reading it every step would sync
            detail = f"loss {self.last_loss:.3f}" if math.isfinite(self.last_loss) else ""
            self.progress(PROGRESS_TASK, step, self.run.schedule.total_steps, detail)

    def _log(self, step: int, outcome: StepOutcome) -> None:
        info, window = self.run.info, self.window
        if self.run.per_rank_share and window.loss_sum is not None:
            # siglip / local_loss: each rank's value is its share, and the global loss is their mean
            # (a collective at a logging step, which every rank reaches at the same step)
            shared = torch.stack([window.loss_sum, self.last_loss_on_device.float()])
            all_reduce_(shared, info)
            window.loss_sum, self.last_loss_on_device = shared[0] / info.world_size, shared[1] / info.world_size
        self.last_loss = float(self.last_loss_on_device)
        logged = window.metrics(
            lr=self.run.state.scheduler.get_last_lr()[0], logit_scale=float(outcome.logit_scale),
            batch_size=self.run.cfg.batch_size, device=info.device, corrupt_samples=self.corrupt_samples,
            nonfinite_steps=self.guard.total)
        self.tracker.log_metrics(logged, step=step)
        self.curve.add(step, logged)
        self.window = LogWindow()

    def _end_epoch(self, step: int) -> None:
        """The epoch's mean loss and zero-shot accuracies (every rank computes: an FSDP forward is collective)."""
        info, window = self.run.info, self.epoch_window
        if self.run.per_rank_share and window.loss_sum is not None:  # as for the log window
            all_reduce_(window.loss_sum, info)
            window.loss_sum = window.loss_sum / info.world_size
        epoch, epoch_loss = step // self.run.schedule.steps_per_epoch, window.mean_loss()
        accuracies = self.monitor.accuracies(self.run.state.wrapped.module) if self.monitor else {}
        self.tracker.log_metrics({"epoch": epoch, "epoch_loss": epoch_loss,
                                  **{f"zeroshot/{name}": value for name, value in accuracies.items()}}, step=step)
        self.epoch_curve.add(step, {"epoch": epoch, "loss": epoch_loss, **accuracies})
        self.epoch_window = LogWindow()

    def write_curves(self) -> None:
        """Rank 0: the loss curve and the epoch curve into the run folder (with each checkpoint, and at the end)."""
        if self.run.info.is_main:
            self.curve.write(self.run.cfg.output, self.run.storage)
            self.epoch_curve.write(self.run.cfg.output, self.run.storage)

    def end_loop(self) -> None:
        """The loop is over (before the final checkpoint is written): the counts are summed over ranks (a
        collective) and the loop's duration is fixed."""
        totals = torch.tensor([self.corrupt_samples, self.truncated_shards], dtype=torch.long)
        all_reduce_(totals, self.run.info)
        self.corrupt_samples, self.truncated_shards = int(totals[0]), int(totals[1])
        self.elapsed_loop = max(1e-9, time.monotonic() - self.loop_start)

    def finish(self, step: int, *, checkpoint: str) -> dict[str, Any]:
        """The run's final figures (after `end_loop`); rank 0 writes them with the curves, tokenizer.json and the
        MLflow artifacts (report.write_run_outputs). No barrier: the caller's."""
        run = self.run
        trained_steps = step - run.state.start_step
        metrics = {
            "steps": step,
            "trained_steps_this_run": trained_steps,
            "resumed_from_step": run.state.start_step,
            "total_steps": run.schedule.total_steps,
            "samples_seen": step * run.cfg.batch_size,
            "final_loss": self.last_loss,
            "corrupt_samples": self.corrupt_samples,
            "truncated_shards": self.truncated_shards,
            "nonfinite_steps": self.guard.total,
            "samples_per_s": trained_steps * run.cfg.batch_size / self.elapsed_loop,
            "data_wait_fraction": min(1.0, self.total_wait / self.elapsed_loop),
            "elapsed_s": time.monotonic() - run.started,
            "world_size": run.info.world_size,
            "data_version": run.manifest.data_version,
            "checkpoint": checkpoint,
        }
        if run.info.is_main:
            self.write_curves()
            write_run_outputs(self.tracker, run.cfg.output, run.storage, run.tokenizer, metrics, step)
        return metrics
