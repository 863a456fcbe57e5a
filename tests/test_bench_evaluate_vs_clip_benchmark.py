"""Smoke run of benchmarks/evaluate.py's CLIP_benchmark comparison (section 3): our zero-shot evaluation and
CLIP_benchmark's own code path on the same seeded tiny-vit and the same webdataset folder give the same
predictions. Skipped when CLIP_benchmark is not installed in .bench/clip_benchmark (it is not a dependency; see
the benchmark's docstring for the install command)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / ".bench" / "clip_benchmark"

pytest.importorskip("open_clip")
pytest.importorskip("webdataset")


@pytest.mark.skipif(not (PEER / "clip_benchmark").is_dir(), reason="clip_benchmark not in .bench/clip_benchmark")
def test_zero_shot_agrees_with_clip_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "benchmarks/evaluate.py", "--only", "clip_benchmark", "--cb-images", "96",
                           "--rounds", "1", "--batch", "32", "--workers", "2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["clip_benchmark"]
    assert result["images"] == 96 and result["classes"] == 8
    assert result["differing_predictions"] == 0
    assert result["ours"]["top1"] == result["clip_benchmark"]["top1"]
    assert result["max_abs_cosine_difference"] < 1e-4
    assert result["ours"]["seconds_median"] > 0 and result["clip_benchmark"]["seconds_median"] > 0
