"""What a training run reports: per-step metrics, the run's final figures, and the result handed to callers.

Guarantees:
- MLflow (rank 0 only) gets, every `train.log_every` steps, the averages over the steps since the last log:
  loss, lr, logit_scale, samples_per_s, data_wait_fraction, peak_memory_mb, corrupt_samples, nonfinite_steps;
  at the end the run's final figures (finite numbers only) and `final.pt`, `tokenizer.json`, `metrics.json` as
  artifacts under `checkpoint/`;
- `train.output/metrics.json` (rank 0, written atomically, keys sorted) holds the final figures; a finished run
  started again reports it back unchanged (`load_result`), and so does the launcher after a torchrun job;
- `TrainResult` is what every caller gets, in one process or on every rank;
- `LogWindow` keeps its loss sums on the device between logs: adding a step never syncs with the device;
- each invocation of the stage is its own MLflow run (a segment), with the params it ran with: a run folder trained
  in three goes has three runs, all tagged RUN_FOLDER_TAG = the folder, each with RESUMED_FROM_STEP_TAG (0 for a
  fresh start) and RESUMED_FROM_RUN_TAG (the run of the segment that wrote the checkpoint it continued from); an
  invocation that finds the run already finished trains nothing and says so (NOTHING_TO_TRAIN_TAG).
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from clip import storage as storage_lib
from clip.config import StorageConfig
from clip.formats.checkpoint import (
    EPOCH_CURVE_NAME,
    LOSS_CURVE_NAME,
    MLFLOW_RUN_KEY,
    RUN_METRICS_NAME,
    RUN_TOKENIZER_NAME,
)
from clip.result import StageResult
from clip.tokenizer import Tokenizer
from clip.tracking import Tracker
from clip.train.checkpoint import FINAL_NAME

RUN_FOLDER_TAG = "clip.train_run_folder"  # the same on every segment of one training run: what links them
RESUMED_FROM_STEP_TAG = "clip.resumed_from_step"
RESUMED_FROM_RUN_TAG = "clip.resumed_from_run"
NOTHING_TO_TRAIN_TAG = "clip.nothing_to_train"  # "true": the run was finished already; no metrics logged
CURVE_COLUMNS = ("step", "loss", "lr", "logit_scale", "samples_per_s")


class LossCurve:
    """The run's loss curve, one row per log window, as `train.output/loss_curve.csv` (rank 0 writes it with each
    checkpoint and at the end). A resumed run keeps the rows up to its checkpoint's step and continues them, so
    the file is one curve however often the run was restarted (what `dvc plots` and people read).
    `epoch_curve` is the same kind of file with one row per epoch (`step` first in both)."""

    def __init__(self, rows: list[dict[str, float]] | None = None, columns: tuple[str, ...] = CURVE_COLUMNS,
                 name: str = LOSS_CURVE_NAME) -> None:
        self.rows, self.columns, self.name = list(rows or []), columns, name

    @classmethod
    def epoch_curve(cls, set_names: list[str]) -> LossCurve:
        """Per epoch: the step it ended at, its number, its mean loss and the zero-shot top-1 of each set."""
        return cls(columns=("step", "epoch", "loss", *set_names), name=EPOCH_CURVE_NAME)

    def resume(self, run_dir: str, storage: StorageConfig, upto_step: int) -> LossCurve:
        """The rows of this curve's file in `run_dir` up to `upto_step` (none when there is no file)."""
        import csv
        import io

        try:
            text = storage_lib.read_bytes(storage_lib.join(run_dir, self.name), storage).decode("utf-8")
        except FileNotFoundError:
            return self
        for row in csv.DictReader(io.StringIO(text)):
            try:
                parsed = {name: float(row[name]) for name in self.columns}
            except (KeyError, TypeError, ValueError):
                continue  # a damaged line: the curve is a report, never a reason to stop
            if parsed["step"] <= upto_step:
                self.rows.append(parsed)
        return self

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": float(step), **{name: float(metrics.get(name, math.nan))
                                                   for name in self.columns[1:]}})

    def to_csv_bytes(self) -> bytes:
        lines = [",".join(self.columns)]
        for row in self.rows:
            lines.append(",".join(str(int(row[name])) if name in ("step", "epoch") else repr(row[name])
                                  for name in self.columns))
        return ("\n".join(lines) + "\n").encode("utf-8")

    def write(self, run_dir: str, storage: StorageConfig) -> str:
        uri = storage_lib.join(run_dir, self.name)
        storage_lib.write_bytes(uri, self.to_csv_bytes(), storage)
        return uri


@dataclass(kw_only=True)
class TrainResult(StageResult):
    """metrics: the run's final figures (those of `train.output/metrics.json`); outputs: `checkpoint` (final.pt),
    `tokenizer` (tokenizer.json) and `run_metrics` (metrics.json), all in `train.output`.
    The fields are the figures later stages and tests read most."""

    checkpoint: str  # URI of final.pt
    tokenizer: str  # URI of tokenizer.json
    data_version: str  # the manifest version trained on
    steps: int  # the step the run ended at (== total_steps when it finished)
    total_steps: int
    resumed_from_step: int  # 0 for a fresh start

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], output: str) -> TrainResult:
        tokenizer = storage_lib.join(output, RUN_TOKENIZER_NAME)
        return cls(
            metrics=metrics,
            outputs={"checkpoint": metrics["checkpoint"], "tokenizer": tokenizer,
                     "run_metrics": storage_lib.join(output, RUN_METRICS_NAME),
                     "loss_curve": storage_lib.join(output, LOSS_CURVE_NAME),
                     "epoch_curve": storage_lib.join(output, EPOCH_CURVE_NAME)},
            checkpoint=metrics["checkpoint"], tokenizer=tokenizer, data_version=metrics["data_version"],
            steps=int(metrics["steps"]), total_steps=int(metrics["total_steps"]),
            resumed_from_step=int(metrics["resumed_from_step"]),
        )


def load_result(output: str, storage: StorageConfig | None = None) -> TrainResult | None:
    """The result a finished run left in `output` (its metrics.json), or None when there is none."""
    uri = storage_lib.join(output, RUN_METRICS_NAME)
    if not storage_lib.exists(uri, storage):
        return None
    return TrainResult.from_metrics(json.loads(storage_lib.read_bytes(uri, storage)), output)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class LogWindow:
    """The steps since the last metric log; the logged figures are averages over them. The loss sums stay on the
    device (`add`: no host sync) until `metrics` reads them, once per window."""

    loss_sum: torch.Tensor | None = None  # [] fp32 on the device: the sum of the finite losses (None: no step)
    finite_steps: torch.Tensor | None = None  # [] int64 on the device: steps with a finite loss
    steps: int = 0
    wait_s: float = 0.0  # time spent waiting for the loader
    start: float = field(default_factory=time.monotonic)

    def add(self, finite: torch.Tensor, loss: torch.Tensor) -> None:
        """One step: `finite` [] bool, `loss` [] (any value when not finite; it is left out)."""
        kept = torch.where(finite, loss.float(), 0.0)
        if self.loss_sum is None or self.finite_steps is None:
            self.loss_sum, self.finite_steps = kept, finite.long()
        else:
            self.loss_sum, self.finite_steps = self.loss_sum + kept, self.finite_steps + finite.long()
        self.steps += 1

    def mean_loss(self) -> float:
        """The mean finite loss of the window (nan when none): one host read."""
        if self.loss_sum is None or self.finite_steps is None:
            return float("nan")
        loss_sum, finite_steps = torch.stack([self.loss_sum.double(), self.finite_steps.double()]).tolist()
        return loss_sum / finite_steps if finite_steps else float("nan")

    def metrics(self, *, lr: float, logit_scale: float, batch_size: int, device: torch.device,
                corrupt_samples: int, nonfinite_steps: int) -> dict[str, float]:
        elapsed = max(1e-9, time.monotonic() - self.start)
        return {
            "loss": self.mean_loss(),
            "lr": lr,
            "logit_scale": logit_scale,
            "samples_per_s": self.steps * batch_size / elapsed,
            "data_wait_fraction": min(1.0, self.wait_s / elapsed),
            "peak_memory_mb": peak_memory_mb(device),
            "corrupt_samples": corrupt_samples,
            "nonfinite_steps": nonfinite_steps,
        }


def segment_tags(output: str, data_version: str, data_location: str, start_step: int,
                 checkpoint_meta: dict[str, Any] | None) -> dict[str, str | None]:
    """The tags of one training segment's MLflow run (`checkpoint_meta`: of the checkpoint it resumes from)."""
    return {"data_version": data_version, "data_location": data_location, RUN_FOLDER_TAG: output,
            RESUMED_FROM_STEP_TAG: str(start_step),
            RESUMED_FROM_RUN_TAG: (checkpoint_meta or {}).get(MLFLOW_RUN_KEY)}


def write_run_outputs(tracker: Tracker, output: str, storage: StorageConfig, tokenizer: Tokenizer,
                      metrics: dict[str, Any], step: int) -> None:
    """Rank 0 at the end of a run: tokenizer.json (when not there yet), metrics.json, the final figures and the
    artifacts to MLflow."""
    tokenizer_uri = storage_lib.join(output, RUN_TOKENIZER_NAME)
    if not storage_lib.exists(tokenizer_uri, storage):
        storage_lib.write_bytes(tokenizer_uri, tokenizer.to_json().encode("utf-8"), storage)
    storage_lib.write_bytes(storage_lib.join(output, RUN_METRICS_NAME),
                            (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode("utf-8"), storage)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()
                         if isinstance(v, int | float) and math.isfinite(float(v))}, step=step)
    _log_artifacts(tracker, output, storage)


def _log_artifacts(tracker: Tracker, output: str, storage: StorageConfig) -> None:
    if not tracker.enabled:
        return
    names = (FINAL_NAME, RUN_TOKENIZER_NAME, RUN_METRICS_NAME)
    if "://" not in output:
        for name in names:
            tracker.log_artifact(os.path.join(output, name), "checkpoint")
        return
    with tempfile.TemporaryDirectory() as tmp:  # MLflow logs local files: bring the S3 objects here first
        for name in names:
            local = os.path.join(tmp, name)
            storage_lib.download_file(storage_lib.join(output, name), local, storage)
            tracker.log_artifact(local, "checkpoint")
