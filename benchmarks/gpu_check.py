"""The whole GPU check as one prepared command, for the few device minutes a session is lent (issue 26).

    make gpu-wheels                       # here, once: the wheels the GPU machine lacks, into .whl/ (git-ignored)
    make gpu-check OUT=$OUT               # on the GPU machine: python3 there, PYTHONPATH=., no install
    make gpu-check DRY_RUN=1 OUT=DIR      # here: every step on tiny models on the CPU, in a venv holding only
                                          # what the GPU machine has (benchmarks/gpu_machine_packages.txt) + .whl/

Writes DIR/gpu_check.json, DIR/gpu_check.md (device, driver, torch and CUDA versions first; one verdict per goal)
and DIR/gpu_check.log (every step's output). Steps, each in its own process with its own time budget; a step
that runs out is killed and recorded as `timeout`, and the rest still run; the whole check stays under 9 minutes:

1. env: device, driver, versions; the card's bf16 matmul peak, measured (the MFU denominator);
2. gpu_tests: tests/test_gpu.py (pytest -m gpu); in the dry run they are skipped (reported as skipped), and
   gpu_tests_cpu_rehearsal runs their quick ones on the CPU (CLIP_GPU_TESTS_ON_CPU=1): a rehearsal, not a result;
3. train_step_vit_b32 (eager) and train_step_vit_b32_compiled: benchmarks/train_step.py ViT-B-32 batch 512 bf16
   against open_clip in the same process; train_step_rn50: RN50 batch 256;
4. train_accum: benchmarks/train_accum.py, 32,768 pairs as 64 x 512 on one GPU against the 512 micro-batch step;
5. loader: the training loader (clip.train.loader.RankLoader) on 320 px JPEG shards -> 224 px, with and without
   train.gpu_decode: samples/s it delivers alone, and fed into the ViT-B-32 step (data-wait fraction);
6. eval: a ViT-B-32 checkpoint on the GPU (clip.eval.encoders.CheckpointEncoder): images/s from decoded images
   (forward_pixels) and from JPEG webdataset shards (clip.eval.features.extract).

The dry run compiles with torch.compile's aot_eager backend (dynamo tracing and AOT autograd, the parts that break
on an API change; inductor's C++ code generation of two models takes minutes on the 2-core dev box).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "GPU_CHECK_RESULT "
TOTAL_BUDGET_S = 540.0  # 9 minutes, the ceiling on the GPU machine
REPORT_RESERVE_S = 10.0
GOALS = {"vit_b32_samples_per_s": 7000.0, "accum_over_micro": 0.75, "gpu_decode_data_wait": 0.05,
         "eval_images_per_s": 5000.0}


@dataclass
class Step:
    name: str
    budget_s: float  # on the GPU machine
    dry_budget_s: float
    argv: list[str]  # after the interpreter
    env: dict[str, str] = field(default_factory=dict)


def steps(dry: bool) -> list[Step]:
    me = ["benchmarks/gpu_check.py"] + (["--dry-run"] if dry else [])
    vit, rn = ("tiny-vit", "tiny-rn") if dry else ("ViT-B-32", "RN50")
    timing = ["--steps", "2", "--warmup", "1", "--rounds", "2"] if dry else ["--steps", "20", "--warmup", "3",
                                                                            "--rounds", "4"]
    step_script = [*me, "--exec", "benchmarks/train_step.py", "--"]
    pytest = ["-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    out = [
        Step("gpu_tests", 200, 60, [*me, "--exec-module", "pytest", "--", *pytest[2:]]),
        Step("train_step_vit_b32", 50, 60, [*step_script, "--config", vit, "--batch-size", "8" if dry else "512",
                                            "--precision", "bf16", "--peer", "open_clip", *timing]),
        Step("train_accum", 50, 30, [*me, "--exec", "benchmarks/train_accum.py", "--", "--config", vit,
                                     "--precision", "bf16", "--micro-batch", "4" if dry else "512",
                                     "--accum-steps", "4" if dry else "64", "--baseline", "micro",
                                     "--steps", "1" if dry else "3", "--warmup", "1"]),
        Step("loader", 60, 60, [*me, "--step", "loader"]),
        Step("eval", 35, 30, [*me, "--step", "eval"]),
        Step("train_step_rn50", 40, 70, [*step_script, "--config", rn, "--batch-size", "8" if dry else "256",
                                         "--precision", "bf16", "--peer", "open_clip", *timing]),
        Step("train_step_vit_b32_compiled", 120, 60, [*step_script, "--config", vit, "--batch-size",
                                                      "8" if dry else "512", "--precision", "bf16", "--compile",
                                                      "--peer", "open_clip", *timing]),
    ]
    if dry:  # the quick GPU tests' code on the CPU; compile and torchrun are covered by the steps above
        out.insert(1, Step("gpu_tests_cpu_rehearsal", 0, 90, [*me, "--exec-module", "pytest", "--", *pytest[2:],
                                                              "-k", "not compiled and not resumed"],
                           env={"CLIP_GPU_TESTS_ON_CPU": "1"}))
    return out


# ------------------------------------------------------------------------------------------------------------
# running the steps


def install_wheels(site: Path) -> str:
    """pip install --no-index --target `site` .whl/*.whl (what the GPU machine lacks: make gpu-wheels)."""
    wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
    if not wheels:
        return "no .whl/*.whl (run `make gpu-wheels` first): pydantic and open_clip imports will fail"
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *wheels], check=True)
    return f"{len(wheels)} wheels into {site}"


def parse_result(text: str) -> dict[str, Any] | None:
    """The step's result: a `GPU_CHECK_RESULT {...}` line, else the last JSON object printed from a line "{"."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    lines = text.splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start] == "{":
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                return None
    return None


def run_step(step: Step, budget: float, env: dict[str, str], log: io.TextIOBase) -> dict[str, Any]:
    """Run `step` in its own process group; kill the group when `budget` seconds are spent."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, *step.argv], cwd=REPO, env={**env, **step.env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, budget))
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    seconds = round(time.monotonic() - started, 1)
    log.write(f"\n===== {step.name}: {status} in {seconds} s (budget {budget:.0f} s)\n$ python {' '.join(step.argv)}\n"
              f"{output}\n")
    log.flush()
    result = parse_result(output or "")
    if step.name.startswith("gpu_tests"):
        result = pytest_summary(output or "")
    tail = "\n".join((output or "").strip().splitlines()[-3:])
    print(f"[gpu-check] {step.name}: {status} in {seconds} s" + ("" if status == "ok" else f"\n{tail}"), flush=True)
    return {"status": status, "seconds": seconds, "budget_s": round(budget), "result": result}


def pytest_summary(output: str) -> dict[str, Any]:
    """Counts from pytest's last line ("3 passed, 5 skipped in 9.1s") and the skip reasons (-rs)."""
    import re

    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)",
                                                      output.strip().splitlines()[-1] if output.strip() else "")}
    reasons = sorted({line.split(": ", 1)[-1] for line in output.splitlines() if line.startswith("SKIPPED")})
    failed = [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"counts": counts, "skip_reasons": reasons, "failed": failed}


# ------------------------------------------------------------------------------------------------------------
# the in-process steps: env, loader, eval


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_env(dry: bool) -> dict[str, Any]:
    import torch
    import torchvision

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version(), "dry_run": dry,
                            "host": f"{platform.machine()}, {os.cpu_count()} cores"}
    for module in ("pydantic", "open_clip", "numpy", "pyarrow", "tokenizers", "onnxruntime"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            info[module] = f"missing ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["driver"] = f"unknown ({exc})"
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})", gpus=0, driver=None)
    size = 512 if dry else 8192  # the bf16 matmul peak: the mean of 10 products after 3 warm-ups
    dev = device_name()
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    info["bf16_matmul_tflops"] = round(10 * 2 * size**3 / (time.perf_counter() - began) / 1e12, 2)
    return info


def _loader(folder: Path, tokenizer_json: str, batch: int, workers: int, image_size: int, steps: int,
            gpu_decode: bool):
    """The training loader over `folder`'s shards, as clip.train.stage builds it (streams = workers)."""
    from clip.train.loader import RankLoader, StreamConfig
    from clip.train.streams import DataState, StreamPlan, read_manifest

    manifest = read_manifest(str(folder))
    streams = max(1, workers)
    chunk = batch // streams
    per_epoch = (sum(s.samples for s in manifest.shards) // streams) // chunk
    cfg = StreamConfig(plan=StreamPlan(manifest.shards, streams, seed=0), chunk=chunk, steps_per_epoch=per_epoch,
                       epochs=-(-steps // per_epoch), shuffle_buffer=1000, image_size=image_size,
                       tokenizer_json=tokenizer_json, rank_streams=tuple(range(streams)),
                       start=DataState(positions=[0] * streams), gpu_decode=gpu_decode)
    return RankLoader(cfg, workers, pin_memory=device_name() == "cuda").start()


def step_loader(dry: bool) -> dict[str, Any]:
    """Samples/s the loader delivers (decoded on the device with gpu_decode) alone, and fed into the step."""
    import torch

    from benchmarks.train_e2e import make_shards, tokenizer_for
    from clip.loss import ClipLoss
    from clip.model import create_model
    from clip.optim import build_optimizer
    from clip.train.distributed import DistInfo
    from clip.train.state import TrainState
    from clip.train.step import device_inputs, mark_tokens_checked, train_step
    from clip.train.wrap import wrap_model
    from tests.support.shards import write_manifest

    model_name, image_size, source, samples, batch, steps = (
        ("tiny-vit", 64, 96, 256, 16, 4) if dry else ("ViT-B-32", 224, 320, 6144, 256, 24))
    workers = 2 if dry else max(2, (os.cpu_count() or 4) - 2)
    folder = Path(tempfile.gettempdir()) / f"gpu-check-shards-{samples}-{source}"
    made = time.perf_counter()
    make_shards(folder, samples, source)
    shard_counts = {s["name"]: s["samples"] for s in json.loads((folder / "manifest.json").read_text())["shards"]}
    write_manifest(folder, list(shard_counts), list(shard_counts.values()))  # the data_version rule of the format
    tok = tokenizer_for(folder)
    out: dict[str, Any] = {"model": model_name, "batch": batch, "image_size": image_size, "source_px": source,
                           "workers": workers, "samples": samples, "shards_s": round(time.perf_counter() - made, 1)}
    device = torch.device(device_name())
    info = DistInfo(device=device)
    from clip.tokenizer import Tokenizer

    vocab = Tokenizer.from_json(tok).vocab_size
    wrapped = wrap_model(create_model(model_name, vocab_size=vocab, image_size=image_size), info)
    mark_tokens_checked(wrapped)
    optimizer = build_optimizer(wrapped.module, lr=1e-5)
    state = TrainState(wrapped=wrapped, optimizer=optimizer,  # type: ignore[arg-type]
                       scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), tokenizer=None,
                       model_config={}, train_config={}, data_version="", start_step=0, data_state=None)
    loss_fn = ClipLoss(equal_batches=False)  # gpu_decode may drop a row

    def step(images: torch.Tensor, tokens: torch.Tensor) -> None:
        train_step(state, loss_fn, images, tokens, info, use_bf16=True)

    print(f"loader: shards ready in {out['shards_s']} s, model built", flush=True)  # where a timeout stopped
    for gpu_decode in (False, True):
        key = "gpu_decode" if gpu_decode else "cpu_decode"
        print(f"loader: {key}", flush=True)
        batches = _loader(folder, tok, batch, workers, image_size, 3 * steps + 4, gpu_decode)
        first = next(batches)
        held = device_inputs(first, image_size, device, vocab_size=vocab)[:2]
        for _ in range(2):
            step(*held)
        sync()
        began = time.perf_counter()
        for _ in range(steps):
            step(*held)
        sync()
        synthetic = steps * batch / (time.perf_counter() - began)
        began, delivered = time.perf_counter(), 0  # the loader alone (device decode included)
        for _ in range(steps):
            images, _, _ = device_inputs(next(batches), image_size, device, vocab_size=vocab)
            delivered += images.shape[0]
        sync()
        alone = delivered / (time.perf_counter() - began)
        wait, began = 0.0, time.perf_counter()  # fed into the step
        for _ in range(steps):
            t0 = time.perf_counter()
            host = next(batches)
            wait += time.perf_counter() - t0
            step(*device_inputs(host, image_size, device, vocab_size=vocab)[:2])
        sync()
        elapsed = time.perf_counter() - began
        batches.close()
        out[key] = {"loader_samples_per_s": round(alone, 1), "step_samples_per_s": round(synthetic, 1),
                    "fed_samples_per_s": round(steps * batch / elapsed, 1),
                    "fed_over_synthetic": round(steps * batch / elapsed / synthetic, 3),
                    "data_wait_fraction": round(wait / elapsed, 3)}
        if device.type == "cpu":
            out[key]["note"] = "gpu_decode is CUDA-only: on the CPU the loader decodes in its workers either way"
    return out


def write_jpeg_webdataset(folder: Path, n: int, px: int, shards: int) -> None:
    """`n` synthetic-colors images as JPEG in CLIP_benchmark's webdataset layout (clip.evalsets.webdataset)."""
    from clip.eval.synthetic_sets import SYNTHETIC_TEMPLATES
    from clip.formats.tar import DeterministicTarWriter
    from clip.synthetic import eval_classnames, generate_eval_set

    classes = list(eval_classnames("synthetic-colors"))
    (folder / "test").mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("\n".join(classes) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in SYNTHETIC_TEMPLATES) + "\n")
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    samples = generate_eval_set("synthetic-colors", seed=0, n=n, image_size=px)
    per_shard = -(-n // shards)
    for shard in range(shards):
        with open(folder / "test" / f"{shard}.tar", "wb") as f:
            writer = DeterministicTarWriter(f)
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                image, label = samples[i]
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                writer.add_sample(f"s{i:06d}", {"jpg": buffer.getvalue(), "cls": str(classes.index(label)).encode()})
            writer.close()


def step_eval(dry: bool) -> dict[str, Any]:
    import numpy as np

    from benchmarks.evaluate import seeded_checkpoint
    from clip.eval.encoders import CheckpointEncoder
    from clip.eval.features import extract
    from clip.evalsets.webdataset import load_webdataset

    model_name, batch, n_decoded, n_shards, px = ("tiny-vit", 16, 64, 64, 64) if dry else (
        "ViT-B-32", 256, 8192, 4096, 256)
    workers = 2 if dry else max(2, (os.cpu_count() or 4) - 2)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-eval-"))
    encoder = CheckpointEncoder.load(str(seeded_checkpoint(model_name, folder)), device=device_name())
    pixels = np.random.default_rng(0).normal(
        size=(batch, 3, encoder.image_size, encoder.image_size)).astype(np.float32)
    encoder.forward_pixels(pixels)  # warm-up
    rounds = max(1, n_decoded // batch)
    began = time.perf_counter()
    for _ in range(rounds):
        encoder.forward_pixels(pixels)  # the embeddings come back to the host: the sync is in it
    decoded_rate = rounds * batch / (time.perf_counter() - began)
    write_jpeg_webdataset(folder / "data", n_shards, px, shards=workers)
    evalset = load_webdataset(folder / "data", "test")
    extracted = extract(encoder, evalset, batch_size=batch, workers=workers)
    shutil.rmtree(folder, ignore_errors=True)
    return {"model": model_name, "device": encoder.device, "batch": batch, "workers": workers,
            "decoded_images_per_s": round(decoded_rate, 1), "jpeg_shards": {"images": extracted.total,
                                                                            "image_px": px,
                                                                            "images_per_s": round(
                                                                                extracted.total / extracted.seconds,
                                                                                1)}}


# ------------------------------------------------------------------------------------------------------------
# verdicts and the report


def verdicts(results: dict[str, dict[str, Any]], dry: bool) -> list[dict[str, Any]]:
    def res(name: str) -> dict[str, Any]:
        return results.get(name, {}).get("result") or {}

    peak = res("env").get("bf16_matmul_tflops")
    vit = [res(n).get("ours", {}).get("samples_per_s") for n in ("train_step_vit_b32", "train_step_vit_b32_compiled")]
    vit = [v for v in vit if v is not None]
    accum = res("train_accum").get("throughput_ratio_accumulated_over_one_piece")
    wait = res("loader").get("gpu_decode", {}).get("data_wait_fraction")
    eval_rate = res("eval").get("decoded_images_per_s")
    tests = res("gpu_tests").get("counts", {})
    rows = [
        ("GPU tests pass", "all passed, none skipped", tests.get("passed", 0) > 0 and not tests.get("failed")
         and not tests.get("errors") and not tests.get("error") and not tests.get("skipped"),
         f"{tests}" if tests else None),
        ("ViT-B-32 batch 512 bf16 train step", f">= {GOALS['vit_b32_samples_per_s']:,.0f} samples/s",
         bool(vit) and max(vit) >= GOALS["vit_b32_samples_per_s"], f"{max(vit):,.1f} samples/s" if vit else None),
        ("32,768 by accumulation vs the micro-batch step", f">= {GOALS['accum_over_micro']:.0%} of its samples/s",
         accum is not None and accum >= GOALS["accum_over_micro"], f"{accum:.1%}" if accum is not None else None),
        ("loader keeps the step fed with gpu_decode", f"data wait < {GOALS['gpu_decode_data_wait']:.0%}",
         wait is not None and wait < GOALS["gpu_decode_data_wait"], f"{wait:.1%}" if wait is not None else None),
        ("evaluation of ViT-B-32 on the GPU, decoded images", f">= {GOALS['eval_images_per_s']:,.0f} images/s",
         eval_rate is not None and eval_rate >= GOALS["eval_images_per_s"],
         f"{eval_rate:,.1f} images/s" if eval_rate is not None else None),
    ]
    out = []
    for goal, target, met, value in rows:
        verdict = "not measured" if value is None else ("met" if met else "NOT met")
        if dry:
            verdict = "dry run (tiny models on the CPU): not a measurement"
        out.append({"goal": goal, "target": target, "value": value, "verdict": verdict})
    if peak and vit:
        out[1]["mfu"] = {name: round(res(name)["ours"]["tflops_per_s"] / peak, 3)
                         for name in ("train_step_vit_b32", "train_step_vit_b32_compiled")
                         if res(name).get("ours")}
    return out


def markdown(report: dict[str, Any]) -> str:
    env = report["steps"].get("env", {}).get("result") or {}
    lines = ["# GPU check" + (" (DRY RUN: tiny models on the CPU, not a measurement)" if report["dry_run"] else ""),
             "", f"Device: {env.get('device')} x{env.get('gpus')}, driver {env.get('driver')}, torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}; "
             f"bf16 matmul peak measured {env.get('bf16_matmul_tflops')} TFLOP/s.",
             f"Wall time {report['wall_s']} s (budget {TOTAL_BUDGET_S:.0f} s); wheels: {report['wheels']}.", "",
             "## Verdicts", "", "| goal | target | value | verdict |", "|---|---|---|---|"]
    lines += [f"| {v['goal']} | {v['target']} | {v['value'] or '-'} | {v['verdict']} |" for v in report["verdicts"]]
    lines += ["", "## Steps", "", "| step | status | seconds (budget) | result |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        summary = json.dumps(step.get("result"), separators=(",", ":"))
        summary = summary if len(summary) <= 600 else summary[:600] + "..."
        lines.append(f"| {name} | {step['status']} | {step['seconds']} ({step.get('budget_s', '-')}) | `{summary}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".gpu-check", help="folder for gpu_check.json / .md / .log")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, every step")
    parser.add_argument("--step", choices=["env", "loader", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--exec", dest="script", help=argparse.SUPPRESS)  # a benchmark script, in this process
    parser.add_argument("--exec-module", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if args.dry_run and (args.script or args.exec_module):
        import torch

        torch.compile = _with_backend(torch.compile, "aot_eager")  # see the module docstring
    if args.script:
        import runpy

        sys.argv = [args.script, *rest]
        runpy.run_path(str(REPO / args.script), run_name="__main__")
        return 0
    if args.exec_module:
        import runpy

        sys.argv = [args.exec_module, *rest]
        runpy.run_module(args.exec_module, run_name="__main__", alter_sys=True)
        return 0
    if args.step:
        result = {"env": step_env, "loader": step_loader, "eval": step_eval}[args.step](args.dry_run)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    began = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.gettempdir()) / "gpu-check-site"
    wheels = install_wheels(site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="1")
    report: dict[str, Any] = {"dry_run": args.dry_run, "wheels": wheels, "steps": {}}
    with open(out / "gpu_check.log", "w") as log:
        for step in [Step("env", 40, 30, [__file__, "--step", "env"] + (["--dry-run"] if args.dry_run else [])),
                     *steps(args.dry_run)]:
            left = TOTAL_BUDGET_S - REPORT_RESERVE_S - (time.monotonic() - began)
            if left < 5:
                report["steps"][step.name] = {"status": "timeout", "seconds": 0, "budget_s": 0,
                                              "result": None, "note": "no time left in the 9-minute budget"}
                continue
            budget = min(step.dry_budget_s if args.dry_run else step.budget_s, left)
            report["steps"][step.name] = run_step(step, budget, env, log)
    report["wall_s"] = round(time.monotonic() - began, 1)
    report["verdicts"] = verdicts(report["steps"], args.dry_run)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _with_backend(compile_fn: Any, backend: str) -> Any:
    def compile_with(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        return compile_fn(*args, **kwargs)

    return compile_with


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
