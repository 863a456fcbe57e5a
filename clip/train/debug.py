"""Test and debug aids of the training loop (the `debug` config section), read by every rank.

- `debug.keys_log=path`: each rank appends JSON lines to `path.rank<R>`: `{"event": "start", "from_step",
  "restart"}` when it starts (restart: torchrun's restart count) and `{"step", "keys"}` per trained step (the
  sample keys of its part of the global batch). Tests compare these across runs, resumes and world sizes.
- `debug.fault_nonfinite_steps=[3, 4]`: the loss of these (1-based) steps is made NaN (tests of the guard).
- `debug.fault_step_delay_s=0.2`: sleep this long after every step (tests that kill a worker mid-run).

With the defaults every hook does nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from clip.config import DebugConfig

RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun in every worker


class DebugHooks:
    def __init__(self, cfg: DebugConfig, rank: int) -> None:
        self.keys_log = Path(f"{cfg.keys_log}.rank{rank}") if cfg.keys_log else None
        self.poisoned_steps = frozenset(cfg.fault_nonfinite_steps)
        self.step_delay_s = cfg.fault_step_delay_s

    def _write(self, record: dict[str, Any]) -> None:
        if self.keys_log is None:
            return
        with open(self.keys_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def log_start(self, from_step: int) -> None:
        restart = int(os.environ.get(RESTART_COUNT_ENV, "0"))
        self._write({"event": "start", "from_step": from_step, "restart": restart})

    def log_step(self, step: int, keys: list[str]) -> None:
        self._write({"step": step, "keys": keys})

    def poisons(self, step: int) -> bool:
        """Whether this step's loss is to be made NaN."""
        return step in self.poisoned_steps

    def after_step(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
