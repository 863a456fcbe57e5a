"""Run `clip-pipeline shard` on an empty keep-list N times beside K busy processes; count how each run ended.

    python benchmarks/abort_repro.py --runs 200 --busy 3

The command refuses the empty keep-list with one line and exit status 1. It used to abort at interpreter exit now
and then ("terminate called without an active exception", SIGABRT) when the CPUs were busy: the Arrow CPU-pool
thread that pq.read_table decoded the keep-list on released the keep-list's Python bytes late, while the interpreter
was finalizing (clip/formats/dedup.py). The busy processes are always killed, also on Ctrl-C or SIGTERM. Prints one JSON line: the runs, a count per outcome
(`exit 1`, `SIGABRT`, ...) and the end of one stderr of each.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLI = str(Path(sys.executable).with_name("clip-pipeline"))
ABORT_MESSAGE = "terminate called without an active exception"


def write_empty_keep_list(root: Path) -> list[str]:
    """An empty keep.parquet under root/dedup and an empty raw folder; returns the `shard` arguments that read them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "dedup").mkdir(parents=True, exist_ok=True)
    (root / "raw").mkdir(exist_ok=True)
    columns = ("key", "shard", "sha256", "caption_digest")
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in columns}), root / "dedup" / "keep.parquet")
    return ["shard", "--set", f"shard.dedup_dir={root / 'dedup'}", "--set", f"shard.input_dir={root / 'raw'}",
            "--set", f"shard.output={root / 'out'}"]


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes spinning a CPU each while the block runs; always killed after it."""
    # SIGTERM (timeout, a test runner) exits through the finally below instead of leaving the spinners behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def outcome(returncode: int) -> str:
    """`exit N` for a normal exit, the signal's name for a killed process (a negative return code)."""
    return signal.Signals(-returncode).name if returncode < 0 else f"exit {returncode}"


def run_many(runs: int, busy: int, cwd: Path) -> tuple[collections.Counter[str], dict[str, str]]:
    """Outcome -> count over `runs` runs of the shard command on an empty keep-list beside `busy` spinners, and
    the last lines of stderr of the first run of each outcome. A run whose stderr carries std::terminate's message
    counts as SIGABRT whatever its status says."""
    args = write_empty_keep_list(cwd)
    counts: collections.Counter[str] = collections.Counter()
    stderr_of: dict[str, str] = {}
    with busy_processes(busy):
        for _ in range(runs):
            result = subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
            seen = "SIGABRT" if ABORT_MESSAGE in result.stderr else outcome(result.returncode)
            counts[seen] += 1
            stderr_of.setdefault(seen, "\n".join(result.stderr.strip().splitlines()[-3:]))
    return counts, stderr_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--busy", type=int, default=3, help="busy processes beside the runs")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="abort-repro-") as tmp:
        counts, stderr_of = run_many(args.runs, args.busy, Path(tmp))
    print(json.dumps({"runs": args.runs, "busy": args.busy, "outcomes": dict(counts), "stderr": stderr_of,
                      "seconds": round(time.monotonic() - start, 1)}))


if __name__ == "__main__":
    main()
