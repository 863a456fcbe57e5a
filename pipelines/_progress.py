"""The terminal display of the progress protocol (clip.progress): one Rich bar per task, on stderr.

The library only calls `progress(task, done, total, detail)`; this module is the one place that draws it, so
`clip/` never imports Rich for display and stays usable without a terminal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from clip.progress import Progress


@contextmanager
def rich_progress(console: Console | None = None) -> Iterator[Progress]:
    """Yields a `Progress` that draws each distinct task as a bar: "task  ━━━━  done/total  detail  elapsed"."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with RichProgress(*columns, console=console or Console(stderr=True), transient=False) as bars:
        tasks: dict[str, TaskID] = {}
        # Not a terminal (a pipe: `dvc repro` under the flow, a log): Rich draws the bars once, at the end, so a
        # plain line per tenth of each task says meanwhile how far it is (train's carries the loss).
        plain = not bars.console.is_terminal
        tenths: dict[str, int] = {}

        def update(task: str, done: int, total: int, detail: str = "") -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total, detail=detail)
            bars.update(tasks[task], completed=done, total=total, detail=detail)
            if plain and 0 < done < total and done * 10 // total > tenths.get(task, 0):
                tenths[task] = done * 10 // total
                bars.console.print(f"{task} {done}/{total} {detail}".rstrip(), highlight=False, markup=False,
                                   soft_wrap=True)

        yield update
