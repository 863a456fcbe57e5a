"""Data stages at growing pool sizes: collect -> dedup -> shard on the synthetic source, wall time and peak memory.

For each pool size the three stages run one after another, each as its own `python -m pipelines.<stage>` process
in a fresh working folder (a copy of params.yaml with `collect.synthetic.num_samples` set, tracking off), so a
stage pays its real start-up, reads what the previous stage wrote, and its memory is its own. Per stage:
- wall time of the process;
- peak RSS: the largest sum of resident memory over the stage's process tree (the stage and any worker processes
  it starts), polled every 50 ms; and the largest single process (ru_maxrss from wait4), which polling cannot miss.
Then, per stage over the sizes: the growth exponent of time and of peak memory (least squares of log value on log
samples; 1.0 is linear) and the marginal memory per sample between consecutive sizes (flat when memory per
sample is bounded; the first size carries the interpreter's fixed cost).

    .venv/bin/python -m benchmarks.data_stages                         # 4,096 / 40,960 / 409,600 samples
    .venv/bin/python -m benchmarks.data_stages --sizes 4096,40960      # a quick run
    .venv/bin/python -m benchmarks.data_scale --part b --sizes 4096,40960
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
STAGES = ("collect", "dedup", "shard")
DEFAULT_SIZES = (4_096, 40_960, 409_600)
_POLL_S = 0.05


@dataclass
class StageRun:
    stage: str
    samples: int
    wall_s: float
    peak_tree_rss_mb: float  # largest sum of RSS over the stage's process tree (polled)
    peak_process_rss_mb: float  # largest RSS of any single process of the stage (ru_maxrss, exact)
    metrics: dict  # the stage's own reports/metrics/<stage>.json


def _tree_rss(process: psutil.Process) -> int:
    """Bytes resident in `process` and all its descendants now (0 for the ones that exited meanwhile)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(stage: str, samples: int, folder: Path, overrides: list[str]) -> StageRun:
    """Run `python -m pipelines.<stage>` in `folder` and measure it; raises with its output when it fails."""
    command = [sys.executable, "-m", f"pipelines.{stage}", "--params", "params.yaml",
               "--set", f"collect.synthetic.num_samples={samples}", "--set", "tracking.enabled=false"]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log_path = folder / f"{stage}.log"
    peak = 0
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            process = psutil.Process(child.pid)
            while not done.is_set():
                try:
                    peak = max(peak, _tree_rss(process))
                except psutil.Error:
                    return
                done.wait(_POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(child.pid, 0)  # rusage of the child and the descendants it waited for
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if child.returncode != 0:
        raise RuntimeError(f"{stage} on {samples} samples failed (exit {child.returncode}):\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}")
    metrics_path = folder / "reports" / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    # ru_maxrss is in kilobytes on Linux.
    return StageRun(stage, samples, round(wall, 2), round(peak / 2**20, 1), round(usage.ru_maxrss / 1024, 1), metrics)


def growth_exponent(samples: list[int], values: list[float]) -> float | None:
    """Slope of log(value) on log(samples), least squares; None with fewer than two sizes."""
    if len(samples) < 2:
        return None
    slope, _ = np.polyfit(np.log(samples), np.log(values), 1)
    return round(float(slope), 3)


def summarize(runs: list[StageRun]) -> dict:
    """Per stage: the runs, growth exponents of time and peak memory, memory per sample (whole and marginal)."""
    summary: dict = {}
    for stage in STAGES:
        mine = sorted((r for r in runs if r.stage == stage), key=lambda r: r.samples)
        if not mine:
            continue
        sizes = [r.samples for r in mine]
        peaks = [max(r.peak_tree_rss_mb, r.peak_process_rss_mb) for r in mine]
        marginal = [round((peaks[k + 1] - peaks[k]) * 2**20 / (sizes[k + 1] - sizes[k]))
                    for k in range(len(sizes) - 1)]
        summary[stage] = {
            "samples": sizes,
            "wall_s": [r.wall_s for r in mine],
            "peak_rss_mb": peaks,
            "time_exponent": growth_exponent(sizes, [r.wall_s for r in mine]),
            "memory_exponent": growth_exponent(sizes, peaks),
            "bytes_per_sample": [round(p * 2**20 / n) for p, n in zip(peaks, sizes, strict=True)],
            "marginal_bytes_per_sample": marginal,
        }
    return summary


def print_table(runs: list[StageRun], summary: dict) -> None:
    header = f"{'stage':<8} {'samples':>9} {'wall s':>8} {'tree RSS MB':>12} {'proc RSS MB':>12} {'B/sample':>9}"
    print(header)
    print("-" * len(header))
    for run in sorted(runs, key=lambda r: (STAGES.index(r.stage), r.samples)):
        peak = max(run.peak_tree_rss_mb, run.peak_process_rss_mb)
        print(f"{run.stage:<8} {run.samples:>9,} {run.wall_s:>8.1f} {run.peak_tree_rss_mb:>12,.0f} "
              f"{run.peak_process_rss_mb:>12,.0f} {peak * 2**20 / run.samples:>9,.0f}")
    print()
    for stage, row in summary.items():
        print(f"{stage:<8} time exponent {row['time_exponent']}, memory exponent {row['memory_exponent']}, "
              f"marginal bytes/sample {row['marginal_bytes_per_sample']}")
    dedup = [r for r in runs if r.stage == "dedup" and r.metrics]
    for run in sorted(dedup, key=lambda r: r.samples):
        m = run.metrics
        print(f"dedup at {run.samples:,}: input {m.get('input_samples')}, removed {m.get('removed')} "
              f"{m.get('removed_by_reason')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated synthetic pool sizes (default: %(default)s)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file the runs start from")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every stage, e.g. --set dedup.use_dask=true (repeatable)")
    parser.add_argument("--workdir", default=None, help="parent of the temporary working folders")
    parser.add_argument("--keep", action="store_true", help="keep the working folders (their path is printed)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result JSON here")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] <= 0:
        parser.error(f"--sizes must list positive sample counts, got {args.sizes!r}")

    root = Path(tempfile.mkdtemp(prefix="data-stages-", dir=args.workdir))
    runs: list[StageRun] = []
    try:
        for samples in sizes:
            folder = root / f"n{samples}"
            folder.mkdir()
            shutil.copyfile(args.params, folder / "params.yaml")
            for stage in STAGES:
                run = run_stage(stage, samples, folder, args.overrides)
                runs.append(run)
                print(f"{stage} {samples:,}: {run.wall_s:.1f} s, {run.peak_tree_rss_mb:,.0f} MB", file=sys.stderr)
    finally:
        if args.keep:
            print(f"working folders kept under {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarize(runs)
    print_table(runs, summary)
    result = {"sizes": sizes, "cpus": os.cpu_count(), "stages": summary,
              "runs": [{k: v for k, v in asdict(r).items() if k != "metrics"} for r in runs],
              "dedup_metrics": {r.samples: {k: r.metrics.get(k) for k in ("input_samples", "removed",
                                                                           "removed_by_reason", "near_duplicate_pairs",
                                                                           "near_duplicate_pairs_color_rejected")}
                                for r in runs if r.stage == "dedup"}}
    print(json.dumps(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
