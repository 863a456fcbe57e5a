"""The evaluation report: the results table (clip.formats.results) and PNG plots, written through clip.storage.

    outputs = write_report(output_dir, table, confusions, storage_cfg)   # name -> URI

Files under `evaluate.output_dir` (local or s3://): the table as JSON, CSV and Markdown (clip.formats.results
names them), `scores.png` (one bar per evaluated dataset and task, the mean as a line) and
`confusion-<dataset>.png` for every zero-shot set of at most 20 classes (rows: true class, columns: predicted,
row-normalised). matplotlib with the Agg backend (no display needed); figures are rendered to bytes in memory
and written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from clip import storage
from clip.config import StorageConfig
from clip.formats.results import RESULTS_CSV, RESULTS_JSON, RESULTS_MARKDOWN, ResultsTable

MAX_CONFUSION_CLASSES = 20


@dataclass
class Confusion:
    dataset: str
    classes: list[str]
    labels: np.ndarray  # int64 [N] true class
    predictions: np.ndarray  # int64 [N] predicted class

    def matrix(self) -> np.ndarray:
        c = len(self.classes)
        counts = np.zeros((c, c), dtype=np.int64)
        np.add.at(counts, (self.labels, self.predictions), 1)
        return counts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def scores_png(table: ResultsTable) -> bytes:
    """Horizontal bars: one per evaluated (dataset, task), value in [0, 1]; the mean as a dashed line."""
    plt = _pyplot()
    rows = [r for r in table.rows if r.status == "ok" and r.value is not None]
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(rows), 2) + 1))
    try:
        names = [f"{r.dataset} / {r.task} ({r.metric})" for r in rows]
        values = [float(r.value) for r in rows]
        ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("score")
        if table.mean is not None:
            ax.axvline(table.mean, color="tab:red", linestyle="--", label=f"mean {table.mean:.3f}")
            ax.legend(loc="lower right")
        for i, v in enumerate(values):
            ax.text(min(v + 0.01, 0.9), i, f"{v:.3f}", va="center", fontsize=8)
        ax.set_title("evaluation")
        return _png(fig)
    finally:
        plt.close(fig)


def confusion_png(confusion: Confusion) -> bytes:
    plt = _pyplot()
    counts = confusion.matrix()
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2 + 0.35 * len(confusion.classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    try:
        image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(confusion.classes))
        ax.set_xticks(ticks, confusion.classes, rotation=90, fontsize=7)
        ax.set_yticks(ticks, confusion.classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{confusion.dataset}: zero-shot confusion (row-normalised)")
        fig.colorbar(image, ax=ax, fraction=0.046)
        return _png(fig)
    finally:
        plt.close(fig)


def write_report(output_dir: str, table: ResultsTable, confusions: list[Confusion],
                 storage_cfg: StorageConfig | None = None, plots: bool = True) -> dict[str, str]:
    """Write the table (JSON, CSV, Markdown) and the plots; returns name -> URI of everything written."""
    outputs: dict[str, str] = {}
    for name, data in ((RESULTS_JSON, table.to_json_bytes()), (RESULTS_CSV, table.to_csv().encode("utf-8")),
                       (RESULTS_MARKDOWN, table.to_markdown().encode("utf-8"))):
        uri = storage.join(output_dir, name)
        storage.write_bytes(uri, data, storage_cfg)
        outputs[name] = uri
    if plots:
        uri = storage.join(output_dir, "scores.png")
        storage.write_bytes(uri, scores_png(table), storage_cfg)
        outputs["scores.png"] = uri
        for confusion in confusions:
            if len(confusion.classes) <= MAX_CONFUSION_CLASSES and len(confusion.labels):
                name = f"confusion-{confusion.dataset}.png"
                uri = storage.join(output_dir, name)
                storage.write_bytes(uri, confusion_png(confusion), storage_cfg)
                outputs[name] = uri
    return outputs
