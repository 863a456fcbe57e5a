"""Stage metrics: every stage writes one flat JSON object to `reports/metrics/<stage>.json` (DVC declares them).

Written atomically through `clip.storage`, keys sorted, so two runs that measured the same thing give the same
file and a reader never sees half a file.
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


def plots_uri(name: str, plots_dir: str = PLOTS_DIR) -> str:
    return storage.join(plots_dir, name)


def metrics_uri(stage: str, metrics_dir: str = METRICS_DIR) -> str:
    return storage.join(metrics_dir, f"{stage}.json")


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
