"""A rich progress display driven by plain callbacks, so the library stays usable without a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

ProgressFn = Callable[[str, int, int], None]  # (task description, done, total)


@contextmanager
def rich_progress(console: Console | None = None) -> Iterator[ProgressFn]:
    """Yields `update(description, done, total)`; one bar per distinct description, on stderr."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        tasks: dict[str, TaskID] = {}

        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = progress.add_task(description, total=total)
            progress.update(tasks[description], completed=done, total=total)

        yield update
