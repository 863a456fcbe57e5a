"""When the training loop writes a checkpoint, and writing it (files: clip/train/checkpoint.py, content:
clip/train/state.py).

    checkpointer = Checkpointer(run, position, guard, stop, with_each=log.write_curves)
    checkpoint_due = checkpointer.due(step)              # every train.checkpoint_every steps, latched
    checkpointer.after_step(step, batch, sync=...)       # step-NNNNNNNN.pt when due; a stop signal: TrainingStopped
    final_uri = checkpointer.save_final(step)            # final.pt

Guarantees:
- a step checkpoint every `train.checkpoint_every` steps, never inside a non-finite streak: one due there is
  written at the first step after the streak ends (each step until then is a sync point); the last step has
  none (final.pt is written instead);
- a stop signal (clip/train/stop.py) is agreed on by the ranks only at sync points (logging or checkpoint steps,
  where the host reads the device anyway), and then gives a step checkpoint (again never mid-streak) and
  `TrainingStopped`;
- after each step checkpoint only the newest `train.keep_checkpoints` are kept, `with_each` runs (the curves that
  go with it) and the ranks meet (barrier);
- final.pt at the end, unless the run trained nothing from an earlier final.pt.
"""

from __future__ import annotations

from collections.abc import Callable

from clip import storage as storage_lib
from clip.train.checkpoint import FINAL_NAME, prune_checkpoints, step_name
from clip.train.distributed import barrier
from clip.train.loader import Batch
from clip.train.prepare import PreparedRun
from clip.train.state import DataPosition, save_training_state
from clip.train.step import NonFiniteGuard
from clip.train.stop import StopSignals, TrainingStopped


class Checkpointer:
    """The checkpoint schedule of one run (see the module doc); every rank holds one and calls it at every step."""

    def __init__(self, run: PreparedRun, position: DataPosition, guard: NonFiniteGuard, stop: StopSignals, *,
                 with_each: Callable[[], None]) -> None:
        self.run, self.position, self.guard, self.stop, self.with_each = run, position, guard, stop, with_each
        self.every, self.keep, self.output = run.cfg.checkpoint_every, run.cfg.keep_checkpoints, run.cfg.output
        self.total_steps = run.schedule.total_steps
        self.pending = False  # a checkpoint step fell inside a non-finite streak: write at the next finite step

    def due(self, step: int) -> bool:
        """Whether a step checkpoint is due at `step`: a checkpoint step, or one still pending from a streak."""
        self.pending = self.pending or step % self.every == 0
        return self.pending

    def after_step(self, step: int, batch: Batch, *, sync: bool) -> None:
        """Write the step checkpoint when one is due (or a stop signal is agreed, at a `sync` step) and the newest
        step was finite; raise TrainingStopped after a stop's checkpoint. Collective: every rank calls it."""
        info = self.run.info
        stop_due = sync and step < self.total_steps and self.stop.agreed(info)
        # never mid-streak (a stop then waits for the next finite logging or checkpoint step)
        if not ((self.pending or stop_due) and self.guard.in_a_row == 0 and step < self.total_steps):
            return
        self.pending = False
        data_state = self.position.global_state(batch.epoch, batch.step_in_epoch + 1, info)
        step_uri = storage_lib.join(self.output, step_name(step))
        if save_training_state(self.run.state, step_uri, step, data_state, info, self.run.storage):
            prune_checkpoints(self.output, self.keep, self.run.storage)
        self.with_each()
        barrier(info)
        if stop_due:
            raise TrainingStopped(step, step_uri, self.stop.signal_name)

    def save_final(self, step: int) -> str:
        """final.pt at `step` (unless this run trained nothing after resuming from final.pt); returns its URI.
        Collective under FSDP; no barrier."""
        final_uri = storage_lib.join(self.output, FINAL_NAME)
        state = self.run.state
        if step > state.start_step or not self.run.point.is_final:
            data_state = self.position.global_state(self.position.epoch, self.position.steps_per_epoch,
                                                    self.run.info)
            save_training_state(state, final_uri, step, data_state, self.run.info, self.run.storage)
        return final_uri
