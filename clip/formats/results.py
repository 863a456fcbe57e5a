"""The evaluation results table (docs/formats.md "Evaluation results"): one row per (dataset, task).

`results.json` (the table as a list of rows plus the mean over evaluated rows), `results.csv` and `results.md`
hold the same rows in the same order. Datasets whose data is absent are rows with `status: "skipped"` and the
path looked for, never dropped; datasets that could not be loaded or scored are rows with `status: "failed"` and
the reason; the mean covers `status: "ok"` rows only, few-shot rows left out (they are one dataset's curve,
k = 1, 2, 4, ...: counted in the mean they would outweigh the datasets without one). v1 files (without the
few-shot fields) still load. The distribution-shift summary rows (`SUMMARY_TASKS`) are left out of the mean too.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from clip.formats.errors import FormatError

RESULTS_FORMAT = "clip-pipeline/eval-results/v2"
READABLE_FORMATS = ("clip-pipeline/eval-results/v1", RESULTS_FORMAT)  # v2 added shots, spread, matching_shots
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_MARKDOWN = "results.md"
SCORES_PLOT = "scores.png"  # beside the table: one bar per evaluated dataset and task (clip.eval.report)
# Rows derived from other rows (the distribution-shift summary, clip.eval.robustness): outside `mean`, since they
# restate scores already counted (shift_mean) or are gaps that can be negative (effective_robustness).
SHIFT_MEAN, EFFECTIVE_ROBUSTNESS = "shift_mean", "effective_robustness"
SUMMARY_TASKS = (SHIFT_MEAN, EFFECTIVE_ROBUSTNESS)


@dataclass(frozen=True)
class ResultRow:
    dataset: str
    task: str  # zeroshot | linear_probe | few_shot | retrieval | shift_mean | effective_robustness
    metric: str  # accuracy | mean_per_class | map_11point | roc_auc | top1_top5_mean | recall@k | accuracy_gap
    value: float | None
    samples: int = 0
    status: str = "ok"  # ok | skipped | failed
    note: str = ""  # why skipped (the path looked for) or failed (the error, naming the file)
    skipped: int = 0  # samples skipped because their image did not decode
    details: str = ""  # secondary figures, e.g. "top1=0.81 top5=0.99 mean_per_class=0.80"
    shots: int | None = None  # few-shot rows: labelled train images per class (value: the mean over draws)
    spread: float | None = None  # few-shot rows: standard deviation over the draws
    matching_shots: float | None = None  # zero-shot rows: shots per class a linear probe needs to match this value

    @property
    def label(self) -> str:
        """The row's name within its dataset: the task, with k for a few-shot row (few_shot_4)."""
        return self.task if self.shots is None else f"{self.task}_{self.shots}"

    @property
    def in_mean(self) -> bool:
        return self.status == "ok" and self.value is not None and self.shots is None and self.task not in SUMMARY_TASKS


@dataclass(frozen=True)
class ResultsTable:
    rows: tuple[ResultRow, ...]

    @property
    def mean(self) -> float | None:
        values = [r.value for r in self.rows if r.in_mean]
        return sum(values) / len(values) if values else None

    def to_json_bytes(self) -> bytes:
        doc = {"format": RESULTS_FORMAT, "mean": self.mean, "rows": [asdict(r) for r in self.rows]}
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json_bytes(cls, raw: bytes, uri: str = RESULTS_JSON) -> ResultsTable:
        try:
            doc = json.loads(raw)
            if doc.get("format") not in READABLE_FORMATS:
                raise ValueError(f"format {doc.get('format')!r}, expected one of {', '.join(READABLE_FORMATS)}")
            return cls(rows=tuple(ResultRow(**row) for row in doc["rows"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{uri}: not an evaluation results table ({exc})") from None

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        names = [f.name for f in fields(ResultRow)]
        writer.writerow(names)
        for row in self.rows:
            writer.writerow(["" if getattr(row, n) is None else getattr(row, n) for n in names])
        return out.getvalue()

    def to_markdown(self) -> str:
        lines = ["| dataset | task | metric | value | samples | skipped | status | details |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            value = "" if r.value is None else f"{r.value:.4f}"
            if r.spread is not None and r.value is not None:
                value += f" ± {r.spread:.4f}"
            task = r.task if r.shots is None else f"{r.task} k={r.shots}"
            status = r.status if not r.note else f"{r.status} ({r.note})"
            lines.append(f"| {r.dataset} | {task} | {r.metric} | {value} | {r.samples} | {r.skipped} | {status} "
                         f"| {r.details} |")
        mean = self.mean
        apart = " (few-shot rows apart)" if any(r.shots is not None for r in self.rows) else ""
        lines.append(f"\nMean over {sum(r.in_mean for r in self.rows)} evaluated rows{apart}: "
                     + ("n/a" if mean is None else f"{mean:.4f}"))
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, Any]:
        return {f"{r.dataset}/{r.label}/{r.metric}": r.value for r in self.rows if r.status == "ok"}
