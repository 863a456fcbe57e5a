"""The evaluation results table (docs/formats.md "Evaluation results"): one row per (dataset, task).

`results.json` (the table as a list of rows plus the mean over evaluated rows), `results.csv` and `results.md`
hold the same rows in the same order. Datasets whose data is absent are rows with `status: "skipped"` and the
path looked for, never dropped; the mean covers `status: "ok"` rows only.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from clip.formats.errors import FormatError

RESULTS_FORMAT = "clip-pipeline/eval-results/v1"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_MARKDOWN = "results.md"


@dataclass(frozen=True)
class ResultRow:
    dataset: str
    task: str  # zeroshot | linear_probe | retrieval
    metric: str  # accuracy | mean_per_class | map_11point | roc_auc | top1_top5_mean | recall@k
    value: float | None
    samples: int = 0
    status: str = "ok"  # ok | skipped
    note: str = ""  # why skipped: the path looked for
    skipped: int = 0  # samples skipped because their image did not decode
    details: str = ""  # secondary figures, e.g. "top1=0.81 top5=0.99 mean_per_class=0.80"


@dataclass(frozen=True)
class ResultsTable:
    rows: tuple[ResultRow, ...]

    @property
    def mean(self) -> float | None:
        values = [r.value for r in self.rows if r.status == "ok" and r.value is not None]
        return sum(values) / len(values) if values else None

    def to_json_bytes(self) -> bytes:
        doc = {"format": RESULTS_FORMAT, "mean": self.mean, "rows": [asdict(r) for r in self.rows]}
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json_bytes(cls, raw: bytes, uri: str = RESULTS_JSON) -> ResultsTable:
        try:
            doc = json.loads(raw)
            if doc.get("format") != RESULTS_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {RESULTS_FORMAT}")
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
            status = r.status if not r.note else f"{r.status} ({r.note})"
            lines.append(f"| {r.dataset} | {r.task} | {r.metric} | {value} | {r.samples} | {r.skipped} | {status} "
                         f"| {r.details} |")
        mean = self.mean
        lines.append(f"\nMean over {sum(r.status == 'ok' for r in self.rows)} evaluated rows: "
                     + ("n/a" if mean is None else f"{mean:.4f}"))
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, Any]:
        return {f"{r.dataset}/{r.task}/{r.metric}": r.value for r in self.rows if r.status == "ok"}
