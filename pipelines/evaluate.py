"""Evaluate stage: zero-shot, linear-probe and retrieval scores of the exported model -> reports/eval/.

    clip-pipeline evaluate [--params params.yaml] [--datasets cifar10,mnist --root DIR]
    clip-pipeline evaluate --set evaluate.checkpoint=models/runs/<run>/final.pt    # a PyTorch checkpoint instead
    python -m pipelines.evaluate --set 'evaluate.datasets=[synthetic, cifar10]' --set evaluate.data_root=DIR

Reads the export bundle `evaluate.bundle` (or `evaluate.checkpoint`) and the datasets of `evaluate.datasets` under
`evaluate.data_root`; writes the results table (JSON, CSV, Markdown) and PNG plots to `evaluate.output_dir`,
metrics to reports/metrics/evaluate.json, and prints a short summary table.
"""

from __future__ import annotations

from rich.table import Table

from clip.config import PipelineConfig
from clip.eval import stage
from clip.progress import Progress
from clip.result import StageResult
from pipelines._common import console, stage_main


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    result = stage.run(cfg.evaluate, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                       progress=progress)
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
        summary.add_row(row.dataset, row.task, row.metric, value, str(row.samples), row.note or row.status)
    mean = result.table.mean
    summary.caption = f"mean over evaluated rows: {'n/a' if mean is None else f'{mean:.4f}'}"
    console.print(summary)


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
