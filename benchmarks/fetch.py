"""Fetch benchmark: clip.collect.fetch.Fetcher vs img2dataset on the same URLs, in the same run.

A loopback server (tests/support/webserver.py, its own process) serves 640x480 JPEGs (a few distinct pictures behind
N distinct URLs). Both tools fetch all N URLs, resize to 256 keeping the ratio, re-encode JPEG (quality 90)
and write webdataset tars:
- ours: `processes` worker processes, each one Fetcher with `threads` threads over its slice of the URLs,
  writing raw shards ({key}.jpg/.txt/.json, 1000 samples per tar, temp name then rename);
- img2dataset (the registry package, in its own venv .bench/venv-img2dataset, created here if missing, since
  it pulls a `dataclasses` backport that breaks Prefect): `processes` x `threads`, webdataset output.
Throughput = images written / wall time of the whole run (process start-up included for both).

    .venv/bin/python benchmarks/fetch.py                       # 5000 URLs, 2 processes x 64 threads
    .venv/bin/python benchmarks/fetch.py --n 1000 --modes keep_ratio
    .venv/bin/python benchmarks/fetch.py --repeat 3 --json .bench/fetch.json   # alternating rounds, medians

img2dataset's `keep_ratio` makes the SHORTER side 256 (640x480 -> 341x256); ours bounds the LONGER side
(-> 256x192), which is img2dataset's `keep_ratio_largest`. Both img2dataset modes are run by default
(`keep_ratio` is the reference setting; `keep_ratio_largest` produces the same output size as ours).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / ".bench"
IMG2DATASET_VENV = BENCH_DIR / "venv-img2dataset"


def ensure_img2dataset_venv(venv: Path) -> Path:
    """The img2dataset executable, installing it into its own venv on first use."""
    exe = venv / "bin" / "img2dataset"
    if exe.exists():
        return exe
    print(f"creating {venv} and installing img2dataset (first run only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    return exe


def start_server() -> tuple[subprocess.Popen, int]:
    """tests/support/webserver.py in its own process (so its GIL does not compete with the fetcher's)."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "support" / "webserver.py"), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"image server did not report a port (got {line!r})")
    return proc, int(line)


def write_tar(path: Path, samples: list[tuple[str, bytes, bytes, bytes]]) -> None:
    """A webdataset tar of (key, jpg, txt, json) samples, under a temporary name until complete."""
    import io

    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, jpg, txt, meta in samples:
            for ext, data in (("jpg", jpg), ("txt", txt), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def our_worker(args: tuple[int, list[tuple[int, str]], str, int, int]) -> dict:
    """One process: a Fetcher over a slice of the URLs, writing raw shards as results complete."""
    worker, items, out_dir, threads, per_shard = args
    from clip.collect.fetch import Fetcher
    from clip.config import FetchConfig

    cfg = FetchConfig(
        threads=threads,
        allow_loopback=True,  # the benchmark server is on 127.0.0.1 (img2dataset has no guard at all)
        # Every URL is on one host here; on the web they spread over many. Lift the per-host politeness
        # limits to the worker count, as img2dataset has none.
        per_host_concurrency=threads,
        per_host_rate=1e9,
        max_side=256,
        jpeg_quality=90,
    )
    urls = [url for _, url in items]
    keys = [key for key, _ in items]
    buffer: list[tuple[str, bytes, bytes, bytes]] = []
    shard = 0
    ok = failed = 0
    with Fetcher(cfg) as fetcher:
        for index, result in fetcher.fetch_many(urls):
            if result.status != "ok" or result.image is None:
                failed += 1
                continue
            ok += 1
            key = f"{keys[index]:09d}"
            meta = {
                "key": key, "url": result.url, "caption": "", "width": result.image.width,
                "height": result.image.height, "sha256": result.image.sha256, "phash": result.image.phash,
            }
            buffer.append((key, result.image.jpeg, b"", json.dumps(meta).encode()))
            if len(buffer) >= per_shard:
                write_tar(Path(out_dir) / f"raw-{worker:02d}{shard:03d}.tar", buffer)
                buffer, shard = [], shard + 1
        if buffer:
            write_tar(Path(out_dir) / f"raw-{worker:02d}{shard:03d}.tar", buffer)
        stats = fetcher.latency_stats()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"ok": ok, "failed": failed, "latency": stats, "cpu_s": usage.ru_utime + usage.ru_stime}


def run_ours(urls: list[str], out_dir: Path, processes: int, threads: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    items = list(enumerate(urls))
    slices = [items[p::processes] for p in range(processes)]
    ctx = multiprocessing.get_context("spawn")  # pays the imports, like img2dataset's fresh processes
    started = time.perf_counter()
    with ctx.Pool(processes) as pool:
        parts = pool.map(our_worker, [(p, slices[p], str(out_dir), threads, 1000) for p in range(processes)])
    wall = time.perf_counter() - started
    ok = sum(p["ok"] for p in parts)
    cpu_s = sum(p["cpu_s"] for p in parts)
    return {
        "tool": "clip.collect.fetch",
        "ok": ok,
        "failed": sum(p["failed"] for p in parts),
        "wall_s": round(wall, 2),
        "pairs_per_s": round(ok / wall, 1),
        "cpu_ms_per_pair": round(cpu_s / max(ok, 1) * 1000, 2),
        "latency_per_process": [p["latency"] for p in parts],
        "output_size": _first_image_size(out_dir),
    }


def run_img2dataset(
    exe: Path, url_file: Path, out_dir: Path, processes: int, threads: int, mode: str
) -> dict:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    cmd = [
        str(exe),
        f"--url_list={url_file}",
        "--input_format=txt",
        f"--output_folder={out_dir}",
        "--output_format=webdataset",
        "--image_size=256",
        f"--resize_mode={mode}",
        f"--processes_count={processes}",
        f"--thread_count={threads}",
        "--number_sample_per_shard=1000",
        "--encode_quality=90",
        "--timeout=10",
        "--retries=0",
        "--distributor=multiprocessing",
        "--enable_wandb=False",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # img2dataset and its workers (it reaps them)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ok = failed = 0
    for stats_file in out_dir.glob("*_stats.json"):
        stats = json.loads(stats_file.read_text())
        ok += stats.get("successes", 0)
        failed += stats.get("failed_to_download", 0) + stats.get("failed_to_resize", 0)
    return {
        "tool": f"img2dataset ({mode})",
        "ok": ok,
        "failed": failed,
        "wall_s": round(wall, 2),
        "pairs_per_s": round(ok / wall, 1),
        "cpu_ms_per_pair": round(cpu_s / max(ok, 1) * 1000, 2),
        "output_size": _first_image_size(out_dir),
    }


def _first_image_size(out_dir: Path) -> list[int] | None:
    import io

    from PIL import Image

    for tar_path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    return list(Image.open(io.BytesIO(data)).size)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="URLs to fetch")
    parser.add_argument("--distinct", type=int, default=8, help="distinct 640x480 pictures behind the URLs")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument(
        "--modes", default="keep_ratio,keep_ratio_largest", help="img2dataset resize modes to run (comma list)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds (tools alternate within each)")
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "fetch")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import shutil

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    exe = None if args.skip_img2dataset else ensure_img2dataset_venv(IMG2DATASET_VENV)
    server, port = start_server()
    try:
        urls = [f"http://127.0.0.1:{port}/img/640x480/{i % args.distinct}.jpg?n={i}" for i in range(args.n)]
        for seed in range(args.distinct):  # warm the server's image cache so neither tool pays for generation
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/img/640x480/{seed}.jpg", timeout=10) as resp:
                resp.read()
        url_file = args.out / "urls.txt"
        url_file.write_text("\n".join(urls) + "\n")
        results: list[dict] = []
        modes = [m for m in args.modes.split(",") if m] if exe is not None else []
        # Rounds alternate the tools so that a load swing on a shared machine hits both alike.
        for round_index in range(args.repeat):
            print(f"round {round_index + 1}/{args.repeat}: ours, {args.processes} x {args.threads}", flush=True)
            row = run_ours(urls, args.out / f"ours-{round_index}", args.processes, args.threads)
            results.append({**row, "round": round_index})
            print(json.dumps(results[-1]), flush=True)
            for mode in modes:
                print(f"round {round_index + 1}/{args.repeat}: img2dataset {mode}", flush=True)
                out = args.out / f"img2dataset-{mode}-{round_index}"
                row = run_img2dataset(exe, url_file, out, args.processes, args.threads, mode)  # type: ignore[arg-type]
                results.append({**row, "round": round_index})
                print(json.dumps(results[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(
        f"\n{'round':>5} {'tool':<32} {'ok':>6} {'failed':>6} {'wall s':>8} {'pairs/s':>8} {'ours/x':>7} "
        f"{'cpu ms/pair':>11}  output"
    )
    for row in results:
        ours = next(r for r in results if r["round"] == row["round"] and r["tool"] == "clip.collect.fetch")
        ratio = ours["pairs_per_s"] / row["pairs_per_s"] if row["pairs_per_s"] else float("inf")
        print(
            f"{row['round']:>5} {row['tool']:<32} {row['ok']:>6} {row['failed']:>6} {row['wall_s']:>8} "
            f"{row['pairs_per_s']:>8} {ratio:>7.2f} {row['cpu_ms_per_pair']:>11}  {row['output_size']}"
        )
    summary: dict[str, dict[str, float]] = {}
    for tool in dict.fromkeys(r["tool"] for r in results):
        rows = [r for r in results if r["tool"] == tool]
        summary[tool] = {
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rows),
            "cpu_ms_per_pair": statistics.median(r["cpu_ms_per_pair"] for r in rows),
        }
    ours_median = summary["clip.collect.fetch"]
    print("\nmedians over rounds (cpu ms/pair: user+sys of the tool's processes, server excluded):")
    for tool, row in summary.items():
        print(
            f"  {tool:<32} {row['pairs_per_s']:>8.1f} pairs/s  ours/x {ours_median['pairs_per_s'] / row['pairs_per_s']:.2f}"
            f"   {row['cpu_ms_per_pair']:>6.2f} cpu ms/pair"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": results, "medians": summary}, indent=2))


if __name__ == "__main__":
    main()
