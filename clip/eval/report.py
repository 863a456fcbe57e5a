"""The evaluation report: the results table (clip.formats.results) and PNG plots, written through clip.storage.

    outputs = write_report(output_dir, table, confusions, storage_cfg)   # name -> URI

Files under `evaluate.output_dir` (local or s3://): the table as JSON, CSV and Markdown (clip.formats.results
names them), `scores.png` (one bar per evaluated dataset and task, the mean as a line; few-shot rows apart),
`confusion-<dataset>.png` for every zero-shot set of at most 20 classes (rows: true class, columns: predicted,
row-normalised) and, when evaluate.few_shot is set, `few_shot.png`: per dataset the k-shot probe's mean over the
draws against k (log2 axis, the spread as error bars), zero-shot as a horizontal line and the shots that match
it as a vertical one (the CLIP paper's Figures 6-7), and, when a distribution shift set was scored, `shift.png`:
each set's accuracy against ImageNet's on logit axes with the (approximate) ImageNet-trained baseline line,
y = x and the baseline's anchor, beside bars of ImageNet's and each set's accuracy with the baseline marked (the
CLIP paper's Figure 13; clip.eval.robustness). Every plot is drawn from the table alone. matplotlib with the Agg backend (no display needed); figures are rendered to bytes in memory
and written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from clip import storage
from clip.config import StorageConfig
from clip.formats.results import (
    RESULTS_CSV,
    RESULTS_JSON,
    RESULTS_MARKDOWN,
    SCORES_PLOT,
    ResultRow,
    ResultsTable,
)

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
    rows = [r for r in table.rows if r.in_mean]
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


def few_shot_png(table: ResultsTable) -> bytes | None:
    """One panel per dataset with few-shot rows: k-shot mean +- spread vs k, zero-shot and its matching shots."""
    curves: dict[str, list[ResultRow]] = {}
    for row in table.rows:
        if row.shots is not None and row.status == "ok" and row.value is not None:
            curves.setdefault(row.dataset, []).append(row)
    if not curves:
        return None
    zeroshot = {r.dataset: r for r in table.rows if r.task == "zeroshot" and r.status == "ok" and r.value is not None}
    plt = _pyplot()
    columns = min(3, len(curves))
    panel_rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(panel_rows, columns, figsize=(4 * columns, 3.2 * panel_rows), squeeze=False)
    try:
        for ax, (dataset, rows) in zip(axes.flat, sorted(curves.items()), strict=False):
            rows.sort(key=lambda r: r.shots)
            ax.errorbar([r.shots for r in rows], [r.value for r in rows], yerr=[r.spread or 0.0 for r in rows],
                        marker="o", capsize=3, color="tab:blue", label="linear probe, k-shot")
            ax.set_xscale("log", base=2)
            ax.set_xticks([r.shots for r in rows], [str(r.shots) for r in rows])
            if dataset in zeroshot:
                zs = zeroshot[dataset]
                unmatched = "" if zs.value <= max(r.value for r in rows) else f" (> {rows[-1].shots}-shot)"
                ax.axhline(zs.value, color="tab:red", linestyle="--", label=f"zero-shot {zs.value:.3f}{unmatched}")
                if zs.matching_shots is not None:
                    ax.axvline(zs.matching_shots, color="tab:gray", linestyle=":",
                               label=f"matched at {zs.matching_shots:.2f} shots")
            ax.set_xlabel("labelled images per class (k)")
            ax.set_ylabel(rows[0].metric)
            ax.set_title(dataset)
            ax.legend(loc="lower right", fontsize=7)
        for ax in list(axes.flat)[len(curves):]:
            ax.set_visible(False)
        fig.suptitle("zero-shot vs few-shot linear probes")
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close(fig)


def shift_png(table: ResultsTable) -> bytes | None:
    """The distribution-shift figure (see the module docstring); None when no shift set was scored."""
    from clip.eval.robustness import BASELINE_ANCHOR, IMAGENET, baseline_accuracy
    from clip.evalsets.imagenet_shifts import SHIFT_KEYS

    zeroshot = {r.dataset: float(r.value) for r in table.rows
                if r.task == "zeroshot" and r.status == "ok" and r.value is not None}
    sets = [key for key in SHIFT_KEYS if key in zeroshot]
    if not sets:
        return None
    imagenet = zeroshot.get(IMAGENET)
    plt = _pyplot()
    fig, (trend, bars) = plt.subplots(1, 2, figsize=(12, 5))
    try:
        colours = dict(zip(sets, plt.get_cmap("tab10").colors, strict=False))
        grid = np.linspace(0.01, 0.99, 99)
        trend.plot(grid, grid, color="tab:gray", linestyle=":", label="y = x")
        for key in sets:
            trend.plot(grid, [baseline_accuracy(key, x) for x in grid], color=colours[key], linewidth=1)
            trend.scatter([BASELINE_ANCHOR[IMAGENET]], [BASELINE_ANCHOR[key]], facecolors="none",
                          edgecolors=colours[key], marker="s")
            if imagenet is not None:
                trend.scatter([np.clip(imagenet, 0.01, 0.99)], [np.clip(zeroshot[key], 0.01, 0.99)],
                              color=colours[key], marker="o", label=key)
        ticks = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]
        for scale, limits, set_ticks in ((trend.set_xscale, trend.set_xlim, trend.set_xticks),
                                         (trend.set_yscale, trend.set_ylim, trend.set_yticks)):
            scale("logit")
            limits(0.01, 0.99)
            set_ticks(ticks, [f"{t:.0%}" for t in ticks])
        trend.minorticks_off()
        trend.set_xlabel("ImageNet accuracy (logit axis)")
        trend.set_ylabel("accuracy on the shifted set (logit axis)")
        title = "lines: ImageNet-trained baseline (approximate); squares: its ResNet-101 anchor"
        trend.set_title(title if imagenet is not None else "ImageNet not evaluated: no effective robustness",
                        fontsize=9)
        trend.legend(loc="upper left", fontsize=7)
        names = ([IMAGENET] if imagenet is not None else []) + sets
        values = [zeroshot[name] for name in names]
        bars.bar(range(len(names)), values, color=["tab:gray" if n == IMAGENET else colours[n] for n in names])
        if imagenet is not None:  # bars 1.. are the sets, bar 0 ImageNet
            bars.scatter(range(1, len(sets) + 1), [baseline_accuracy(k, imagenet) for k in sets],
                         color="black", marker="_", s=400, label="baseline (approximate)")
            bars.legend(loc="upper right", fontsize=7)
        for i, value in enumerate(values):
            bars.text(i, value + 0.01, f"{value:.3f}", ha="center", fontsize=8)
        bars.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        bars.set_ylim(0, 1)
        bars.set_ylabel("zero-shot top-1 accuracy")
        fig.suptitle("robustness to natural distribution shift")
        fig.tight_layout()
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
        uri = storage.join(output_dir, SCORES_PLOT)
        storage.write_bytes(uri, scores_png(table), storage_cfg)
        outputs[SCORES_PLOT] = uri
        curves = few_shot_png(table)
        if curves is not None:
            uri = storage.join(output_dir, "few_shot.png")
            storage.write_bytes(uri, curves, storage_cfg)
            outputs["few_shot.png"] = uri
        shift = shift_png(table)
        if shift is not None:
            uri = storage.join(output_dir, "shift.png")
            storage.write_bytes(uri, shift, storage_cfg)
            outputs["shift.png"] = uri
        for confusion in confusions:
            if len(confusion.classes) <= MAX_CONFUSION_CLASSES and len(confusion.labels):
                name = f"confusion-{confusion.dataset}.png"
                uri = storage.join(output_dir, name)
                storage.write_bytes(uri, confusion_png(confusion), storage_cfg)
                outputs[name] = uri
    return outputs
