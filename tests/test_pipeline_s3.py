"""S3 in every stage (issue 11.5): collect -> dedup -> shard -> train with every location on a real S3 API (moto's
server on 127.0.0.1), run as a user runs them (`clip-pipeline <stage>` in an empty folder). Nothing is written to
the working directory apart from the stage metrics and the loss curve (reports/metrics/, reports/plots/, which DVC
reads locally) and the one cache the test names (the
shard stage's local copy of raw input shards, `shard.staging_dir`), and no location is mistaken for a local
folder (`s3:/bucket/...`).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip import storage

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("clip-pipeline"))

SMALL = [
    "collect.synthetic.num_samples=192", "collect.synthetic.image_size=32", "collect.samples_per_shard=64",
    "shard.samples_per_shard=50", "train.batch_size=32", "train.epochs=1", "train.num_workers=1",
    "train.warmup_steps=2", "train.checkpoint_every=2", "train.tokenizer.vocab_size=600", "tracking.enabled=false",
    "train.model_overrides={image_size: 32, vision_layers: 1, text_layers: 1}",
]


def _locations(bucket: str) -> list[str]:
    root = f"s3://{bucket}"
    return [
        f"collect.output_dir={root}/raw", f"collect.queries_path={root}/queries.txt",
        f"dedup.input_dir={root}/raw", f"dedup.output_dir={root}/dedup",
        f"shard.input_dir={root}/raw", f"shard.dedup_dir={root}/dedup", f"shard.output={root}/shards",
        f"train.data={root}/shards", f"train.output={root}/run", "shard.staging_dir=cache/shard-staging",
    ]


def _stage(stage: str, cwd: Path, overrides: list[str]) -> None:
    args = [CLI, stage, "--params", str(REPO / "params.yaml")]
    for override in overrides:
        args += ["--set", override]
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{stage}: " + result.stdout[-2000:] + result.stderr[-3000:]


def _keys(bucket: str) -> set[str]:
    prefix = f"s3://{bucket}/"
    return {info.uri[len(prefix):] for info in storage.list_objects(prefix)}


@pytest.mark.heavy
def test_every_stage_reads_and_writes_s3(tmp_path: Path, s3_bucket: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    overrides = SMALL + _locations(s3_bucket)
    for stage in ("collect", "dedup", "shard", "train"):
        _stage(stage, work, overrides)

    keys = _keys(s3_bucket)
    assert "queries.txt" in keys and "raw/stats.json" in keys
    assert {"dedup/keep.parquet", "dedup/removed.parquet"} <= keys
    final = torch.load(io.BytesIO(storage.read_bytes(f"s3://{s3_bucket}/run/final.pt")), weights_only=True)
    shard_metrics = json.loads((work / "reports/metrics/shard.json").read_text())
    assert final["data_version"] == shard_metrics["data_version"] and final["step"] >= 4
    assert any(key.startswith("shards/") and key.endswith(".tar") for key in keys)

    # The working directory holds the stage metrics and the named cache, nothing else: no local copy of any output
    # (the shard stage uploads each shard as it is written), no `s3:` folder.
    local = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    metrics = [f"reports/metrics/{stage}.json" for stage in ("collect", "dedup", "shard", "train")]
    # the loss curve and the per-epoch learning curve for `dvc plots`, local like the metrics
    metrics += ["reports/plots/train_loss.csv", "reports/plots/train_epochs.csv"]
    cached = [name for name in local if name.startswith("cache/shard-staging/raw/raw-")]
    assert sorted(metrics + cached) == local and cached, local
