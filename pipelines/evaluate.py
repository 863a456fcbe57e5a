"""Evaluate stage: zero-shot, linear-probe and retrieval scores of the exported model -> reports/eval/.

    clip-pipeline evaluate [--params params.yaml] [--datasets cifar10,mnist --root DIR]
    clip-pipeline evaluate --set evaluate.checkpoint=models/runs/<run>/final.pt    # a PyTorch checkpoint instead
    python -m pipelines.evaluate --set 'evaluate.datasets=[synthetic, cifar10]' --set evaluate.data_root=DIR

Reads the export bundle `evaluate.bundle` (or `evaluate.checkpoint`) and the datasets of `evaluate.datasets` under
`evaluate.data_root`; writes the results table (JSON, CSV, Markdown) and PNG plots to `evaluate.output_dir`,
metrics (pipelines._common.metrics_location), and prints a short summary table. A dataset that cannot be loaded or
scored is a `failed` row with its reason; the others are still scored and written, and the command exits 1.
"""

from __future__ import annotations

from rich.table import Table

from clip.config import PipelineConfig
from clip.eval import stage
from clip.progress import Progress
from clip.result import StageResult
from pipelines._common import console, stage_main


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    try:
        result = stage.run(cfg.evaluate, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                           progress=progress)
    except stage.DatasetsFailedError as err:
        # The finished datasets' table is printed as on success (execute_stage writes the error's metrics where
        # the stage's metrics go); the error then makes the exit 1.
        print_summary(err.result)
        raise
    print_summary(result)
    return result


def print_summary(result: stage.EvalResult) -> None:
    if result.table is None:
        return
    summary = Table(title="evaluation", show_lines=False)
    for column in ("dataset", "task", "metric", "value", "samples", "note"):
        summary.add_column(column, justify="right" if column in ("value", "samples") else "left")
    for row in result.table.rows:
        value = "" if row.value is None else f"{row.value:.4f}"
        summary.add_row(row.dataset, row.task, row.metric, value, str(row.samples),
                        f"{row.status}: {row.note}" if row.note else row.status)
    mean = result.table.mean
    summary.caption = f"mean over evaluated rows: {'n/a' if mean is None else f'{mean:.4f}'}"
    console.print(summary)


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
