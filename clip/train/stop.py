"""Stop on a signal: SIGUSR1 or SIGTERM -> a checkpoint at the next logging or checkpoint step, then stop.

What a scheduler sends before it ends a job (SLURM: `--signal=USR1@120` before the time limit, SIGTERM on
`scancel` / `scontrol requeue` / preemption, KillWait seconds before SIGKILL; Kubernetes: SIGTERM, then
terminationGracePeriodSeconds) becomes a step checkpoint, so the job started again (a requeue) resumes from the
step it stopped at instead of from the last periodic checkpoint.

- The handler only records the signal: the loop decides at its next logging or checkpoint step (where it reads the
  device anyway, so the steps in between still read nothing back; keep `train.log_every` x step time well under
  the warning time). Under a launcher the ranks agree there (a MAX all-reduce of the flag): one signalled rank stops
  them all at the same step, with the same checkpoint.
- The checkpoint is an ordinary `step-NNNNNNNN.pt`, written as any other (never inside a non-finite streak: the
  stop then waits for the streak to end); the run then raises `TrainingStopped` (pipelines/train.py: exit status
  `RESUME_EXIT_STATUS`, the stop signals ignored while the process exits). A signal at the last step changes
  nothing: the run finishes.
- Handlers are installed for the duration of the run (main thread only: elsewhere, e.g. a flow's worker thread,
  nothing changes) and the previous ones put back. DataLoader workers are forked with the handler, so a signal sent
  to the whole process tree (SLURM signals every process of a job step) leaves them running for the checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch

from clip.train.distributed import DistInfo, all_reduce_

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# sysexits' EX_TEMPFAIL: stopped on request with a checkpoint written; the same command resumes.
RESUME_EXIT_STATUS = 75


class TrainingStopped(Exception):
    """The run stopped on a signal after writing `checkpoint` (at `step`); run it again to resume."""

    def __init__(self, step: int, checkpoint: str, signal_name: str) -> None:
        super().__init__(f"stopped on {signal_name} at step {step}; checkpoint {checkpoint}: run again to resume")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


def ignore_stop_signals() -> None:
    """SIGUSR1 / SIGTERM ignored from now on (main thread only), for a process exiting after `TrainingStopped`: its
    checkpoint is written, and a further signal (srun ends a step's other tasks as soon as one has exited) must not
    turn its exit status into a death by signal. SIG_IGN, unlike a Python handler, holds through interpreter
    shutdown."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


class StopSignals:
    """`with StopSignals() as stop:` records the first SIGUSR1 / SIGTERM; `stop.agreed(info)` at a sync point."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def agreed(self, info: DistInfo) -> bool:
        """Whether any rank received a stop signal. Collective under a launcher: every rank calls it at the same
        step."""
        if not info.distributed:
            return self.received is not None
        flag = torch.tensor(int(self.received is not None), device=info.device)
        return bool(all_reduce_(flag, info, op=torch.distributed.ReduceOp.MAX))
