"""Stage metrics: every stage writes one flat JSON object, atomically through `clip.storage`, keys sorted, so two
runs that measured the same thing give the same file and a reader never sees half a file.

Where: `reports/metrics/<stage>.json` (`metrics_uri`) is DVC's record of its own run of the stage in a checkout
(dvc.yaml declares it, and its cmds pass it as `--metrics`). A stage run by hand in such a checkout writes beside
its output instead (`metrics_beside`): its outputs may be elsewhere (`--set dedup.output_dir=/elsewhere`), and a
metrics file DVC declares that changed without DVC would make the next `dvc repro` rerun a stage that did not.
"""

from __future__ import annotations

import json
import math
from typing import Any

from clip import storage
from clip.config import StorageConfig

METRICS_DIR = "reports/metrics"
PLOTS_DIR = "reports/plots"  # data series for `dvc plots` (local, like the metrics)
TRAIN_LOSS_PLOT = "train_loss.csv"
TRAIN_EPOCHS_PLOT = "train_epochs.csv"  # the per-epoch learning curve: mean loss and zero-shot accuracy per set


def plots_uri(name: str, plots_dir: str = PLOTS_DIR) -> str:
    return storage.join(plots_dir, name)


def metrics_uri(stage: str, metrics_dir: str = METRICS_DIR) -> str:
    return storage.join(metrics_dir, f"{stage}.json")


def metrics_beside(location: str, stage: str) -> str:
    """The metrics of a stage run by hand, beside its output `location`: `/elsewhere` ->
    `/elsewhere.dedup-metrics.json` (in the bucket for a bucket's root)."""
    name = f"{stage}-metrics.json"
    trimmed = location.rstrip("/")
    if not trimmed or (storage.is_s3_uri(trimmed) and "/" not in trimmed[len("s3://"):]):
        return storage.join(location or ".", name)
    return f"{trimmed}.{name}"


def _plain(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def metrics_bytes(metrics: dict[str, Any]) -> bytes:
    return (json.dumps(_plain(metrics), indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_metrics(uri: str, metrics: dict[str, Any], storage_cfg: StorageConfig | None = None) -> str:
    storage.write_bytes(uri, metrics_bytes(metrics), storage_cfg)
    return uri


def read_metrics(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    return json.loads(storage.read_bytes(uri, storage_cfg))
