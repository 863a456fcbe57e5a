"""One progress protocol for every stage: the library reports, the entry point draws.

A stage's `run(..., progress=...)` calls `progress(task, done, total, detail)` as work advances, e.g.
`progress("reading raw shards", 3, 10, "")` or `progress("collect: shards", 7, 40, "samples ok 6,900, not ok 100")`.
Each distinct `task` is one bar. The library never draws anything itself: `pipelines/` turns these calls into
Rich bars on a terminal, Prefect hands them to its logger, tests collect them. `None` means nobody is watching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def __call__(self, task: str, done: int, total: int, detail: str = "") -> None: ...


def no_progress(task: str, done: int, total: int, detail: str = "") -> None:
    """The progress sink that ignores every report."""


def for_task(progress: Progress | None, task: str) -> Callable[[int, int], None] | None:
    """A `(done, total)` callback bound to one task, or None when `progress` is None (callers skip the calls)."""
    if progress is None:
        return None
    return lambda done, total: progress(task, done, total)


class RecordingProgress:
    """Keeps every report (task -> last (done, total, detail)); for tests and for summaries at the end."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, int, str]] = {}
        self.calls = 0

    def __call__(self, task: str, done: int, total: int, detail: str = "") -> None:
        self.last[task] = (done, total, detail)
        self.calls += 1
