"""The training worker: what every process runs (one process, or each rank under torchrun / srun).

    from clip.train import train
    metrics = train(cfg)   # cfg: PipelineConfig; uses cfg.train, cfg.storage, cfg.tracking, cfg.compute

Per step: the rank's part of the global batch (clip/train/data.py) -> bf16 autocast forward on GPU (fp32 on
CPU) -> global-batch contrastive loss (features all-gathered across ranks, clip.loss) -> if the loss is finite
on every rank: backward, AdamW step, LambdaLR step (linear warm-up then cosine, per step). A non-finite loss
skips the update (counted); `max_nonfinite_steps` in a row stop the run (NonFiniteLossError) with the last
good checkpoint left as it was.

Debug aids (environment variables, read by every rank):
* `CLIP_TRAIN_KEYS_LOG=path`: each rank appends JSON lines to `path.rank<R>`: `{"event": "start", "from_step"}`
  at start and `{"step", "keys"}` per trained step (the sample keys of its part of the global batch).
* `CLIP_TRAIN_FAULT_NONFINITE_STEPS=3,4`: make the loss NaN at these (1-based) steps (tests of the guard).
* `CLIP_TRAIN_FAULT_STEP_DELAY_S=0.2`: sleep this long after every step (tests that kill a worker mid-run).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clip import storage
from clip.config import PipelineConfig, TrainConfig
from clip.train.checkpoint import (
    FINAL_NAME,
    latest_checkpoint,
    load_checkpoint_dict,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_name,
)
from clip.train.data import DataState, RankLoader, StreamConfig, StreamPlan, iter_captions, read_manifest
from clip.train.distributed import DistInfo, all_reduce_, barrier, cleanup, init_distributed
from clip.train.wrap import Wrapped, wrap_model

KEYS_LOG_ENV = "CLIP_TRAIN_KEYS_LOG"
FAULT_NONFINITE_ENV = "CLIP_TRAIN_FAULT_NONFINITE_STEPS"
FAULT_DELAY_ENV = "CLIP_TRAIN_FAULT_STEP_DELAY_S"
TOKENIZER_NAME = "tokenizer.json"
METRICS_NAME = "metrics.json"
MAX_TOKENIZER_CAPTIONS = 2_000_000
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the newest checkpoint is the last good state."""


class WarmupCosine:
    """LambdaLR factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total` steps.
    A callable object (not a closure) so LambdaLR's state_dict stays plain data."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    num_streams: int
    chunk: int  # samples per stream per step
    steps_per_epoch: int
    total_steps: int


def plan_schedule(tcfg: TrainConfig, plan_total_samples: int, world_size: int) -> Schedule:
    """Streams, per-stream chunk and step counts; refuses batch sizes that do not divide evenly."""
    if tcfg.batch_size % world_size:
        raise ValueError(
            f"train.batch_size ({tcfg.batch_size}) is the GLOBAL batch and must be a multiple of the world size "
            f"({world_size} processes)"
        )
    streams = tcfg.streams or world_size * max(1, tcfg.num_workers)
    if streams % world_size:
        raise ValueError(f"train.streams ({streams}) must be a multiple of the world size ({world_size})")
    if tcfg.batch_size % streams:
        raise ValueError(
            f"train.batch_size ({tcfg.batch_size}) must be a multiple of the number of data streams ({streams}; "
            "train.streams, default world_size * num_workers)"
        )
    chunk = tcfg.batch_size // streams
    if tcfg.samples_per_epoch is not None:
        steps_per_epoch = tcfg.samples_per_epoch // tcfg.batch_size
    else:
        steps_per_epoch = (plan_total_samples // streams) // chunk
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has no full step: {tcfg.samples_per_epoch or plan_total_samples} samples per epoch for a "
            f"global batch of {tcfg.batch_size} (train.batch_size)"
        )
    return Schedule(streams, chunk, steps_per_epoch, steps_per_epoch * tcfg.epochs)


# ----------------------------------------------------------------------------------------------------------
# state dicts (plain / DDP / FSDP2 alike: full, unsharded, on CPU)


def _state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(wrapped: Wrapped) -> dict[str, torch.Tensor]:
    if wrapped.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(wrapped.module, options=_state_options())
    return {k: v.detach().cpu().clone() for k, v in wrapped.module.state_dict().items()}


def optimizer_state(wrapped: Wrapped, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if wrapped.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped.module, optimizer, options=_state_options())
    state = optimizer.state_dict()
    return {"state": {k: {n: (t.detach().cpu() if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
                      for k, v in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_optimizer_state(wrapped: Wrapped, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The model weights are loaded into the bare module before wrapping; this restores the optimizer."""
    if wrapped.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(wrapped.module, optimizer, state, options=_state_options())
    else:
        optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# GPU JPEG decoding (train.gpu_decode)


def gpu_decode_batch(jpegs: list[torch.Tensor], image_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Decode JPEG byte tensors on the GPU, resize the short side to `image_size`, centre-crop, normalise.
    A JPEG nvjpeg cannot decode is replaced by its batch neighbour (counted). Returns ([n, 3, S, S], failures)."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        failures = 0
    except RuntimeError:
        decoded, failures = [], 0
        for data in jpegs:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
                failures += 1
        good = [d for d in decoded if d is not None]
        if not good:
            raise RuntimeError("no JPEG of the batch could be decoded on the GPU") from None
        decoded = [d if d is not None else good[i % len(good)] for i, d in enumerate(decoded)]
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    out = []
    for img in decoded:  # [3, H, W] uint8
        h, w = img.shape[1:]
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        resized = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        crop = resized[:, top:top + image_size, left:left + image_size].clamp(0, 255) / 255.0
        out.append((crop - mean) / std)
    return torch.stack(out), failures


# ----------------------------------------------------------------------------------------------------------
# helpers


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _fault_steps() -> set[int]:
    raw = os.environ.get(FAULT_NONFINITE_ENV, "")
    return {int(x) for x in raw.split(",") if x.strip()}


class KeysLog:
    def __init__(self, rank: int) -> None:
        base = os.environ.get(KEYS_LOG_ENV)
        self.path = Path(f"{base}.rank{rank}") if base else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _load_tokenizer(cfg: PipelineConfig, info: DistInfo, manifest: Any, resume: dict[str, Any] | None) -> Any:
    from clip.tokenizer import Tokenizer

    tcfg, scfg = cfg.train, cfg.storage
    if resume is not None:
        return Tokenizer.from_json(resume["tokenizer"])
    if tcfg.tokenizer.kind == "clip_bpe":
        return Tokenizer.from_clip_bpe(tcfg.tokenizer.bpe_path, context_length=tcfg.tokenizer.context_length)
    uri = storage.join(tcfg.output, TOKENIZER_NAME)
    if info.is_main and not storage.exists(uri, scfg):
        captions = iter_captions(manifest, scfg, limit=MAX_TOKENIZER_CAPTIONS)
        tokenizer = Tokenizer.train(captions, tcfg.tokenizer.vocab_size, context_length=tcfg.tokenizer.context_length)
        storage.write_bytes(uri, tokenizer.to_json().encode("utf-8"), scfg)
    barrier(info)  # the others wait for rank 0's tokenizer.json
    return Tokenizer.from_json(storage.read_bytes(uri, scfg).decode("utf-8"))


def _progress(enabled: bool, total: int, completed: int) -> Any:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"), console=Console(stderr=True),
    )
    progress.add_task("train", total=total, completed=completed, status="")
    return progress


# ----------------------------------------------------------------------------------------------------------
# the worker


def train(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) training in this process; collective with the other ranks when under a launcher."""
    info = init_distributed(cfg.compute.device)
    try:
        return _train(cfg, info)
    finally:
        cleanup(info)


def _train(cfg: PipelineConfig, info: DistInfo) -> dict[str, Any]:
    from clip.loss import ClipLoss
    from clip.model import create_model, create_model_from_config, get_config
    from clip.optim import build_optimizer
    from clip.tracking import Tracker

    tcfg, scfg = cfg.train, cfg.storage
    get_config(tcfg.model, **tcfg.model_overrides)  # an unknown model name is refused before any work starts
    started = time.monotonic()
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed % 2**32)
    random.seed(tcfg.seed)

    manifest = read_manifest(tcfg.data, scfg)
    plan_total = sum(s.samples for s in manifest.shards)
    schedule = plan_schedule(tcfg, plan_total, info.world_size)
    plan = StreamPlan(manifest.shards, schedule.num_streams, tcfg.seed, tcfg.resampled)

    found = latest_checkpoint(tcfg.output, scfg)
    resume = found[1] if found else None
    if resume is not None:
        # A resume rebuilds the checkpoint's model: a different model asked for would be silently ignored.
        asked, saved = tcfg.model_dump(mode="json"), resume.get("train_config") or {}
        for key in ("model", "model_overrides"):
            if key in saved and saved[key] != asked[key]:
                raise ValueError(
                    f"{found[0]} was trained with train.{key}={saved[key]!r} but this run asks for "  # type: ignore[index]
                    f"{asked[key]!r}; use a new train.output, or the same train.{key} to resume"
                )
    if resume is not None and resume.get("data_version") not in (None, manifest.data_version):
        # Its data position and schedule belong to other data; carrying on (or reporting its finished run as
        # this one) would silently skip training on the new data version.
        raise ValueError(
            f"{found[0]} was trained on data version {str(resume['data_version'])[:12]}, but {tcfg.data} now "  # type: ignore[index]
            f"holds version {manifest.data_version[:12]}; use a new train.output to train on the new data"
        )
    if resume is not None and int(resume.get("step", 0)) > schedule.total_steps:
        raise ValueError(
            f"{found[0]} is at step {resume['step']}, beyond this run's {schedule.total_steps} steps; "  # type: ignore[index]
            "use a new train.output or more train.epochs"
        )
    start_step = int(resume["step"]) if resume else 0
    metrics_uri = storage.join(tcfg.output, METRICS_NAME)
    if (found is not None and found[0].endswith(FINAL_NAME) and start_step == schedule.total_steps
            and storage.exists(metrics_uri, scfg)):
        # A finished run started again: nothing to train; report what it wrote.
        return json.loads(storage.read_bytes(metrics_uri, scfg))

    tokenizer = _load_tokenizer(cfg, info, manifest, resume)
    if resume is not None:
        model = create_model_from_config(resume["model_config"])
    else:
        overrides = dict(tcfg.model_overrides)
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("context_length", tokenizer.context_length)
        model = create_model(tcfg.model, **overrides)
    model_config = model.config.to_dict()
    image_size = model.config.vision.image_size
    if resume is not None:
        model.load_state_dict(resume["model"])
    wrapped = wrap_model(model, info, grad_checkpointing=tcfg.grad_checkpointing, fsdp=tcfg.fsdp,
                         compile_model=tcfg.compile)
    optimizer = build_optimizer(wrapped.module, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    if wrapped.kind == "fsdp":
        for group in optimizer.param_groups:
            group["foreach"] = False  # groups mix sharded DTensors and the replicated scalar
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(tcfg.warmup_steps, schedule.total_steps))
    if resume is not None:
        load_optimizer_state(wrapped, optimizer, resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
    loss_fn = ClipLoss(local_loss=tcfg.local_loss, gather_with_grad=True)

    data_state = DataState.from_dict(resume.get("data_state") if resume else None, schedule.num_streams)
    per_rank = schedule.num_streams // info.world_size
    rank_streams = tuple(range(info.rank * per_rank, (info.rank + 1) * per_rank))
    stream_cfg = StreamConfig(
        plan=plan, chunk=schedule.chunk, steps_per_epoch=schedule.steps_per_epoch, epochs=tcfg.epochs,
        shuffle_buffer=tcfg.shuffle_buffer, image_size=image_size, tokenizer_json=tokenizer.to_json(),
        rank_streams=rank_streams, start=data_state, gpu_decode=tcfg.gpu_decode and info.device.type == "cuda",
        storage_cfg=scfg.model_dump(),
    )
    positions = list(data_state.positions)

    tracker = Tracker(cfg.tracking, active=info.is_main)
    keys_log = KeysLog(info.rank)
    keys_log.write({"event": "start", "from_step": start_step,
                    "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))})
    use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and info.device.type == "cuda")
    fault_steps = _fault_steps()
    step_delay = float(os.environ.get(FAULT_DELAY_ENV, "0") or 0)
    counters = {"corrupt_samples": 0, "truncated_shards": 0, "nonfinite_steps": 0}
    consecutive_nonfinite = 0
    window = {"loss": 0.0, "steps": 0, "seen": 0, "wait": 0.0, "start": time.monotonic()}
    total_wait, loop_start = 0.0, time.monotonic()
    last_metrics: dict[str, float] = {}
    last_loss = float("nan")
    step = start_step

    def make_checkpoint(step_now: int, state: DataState) -> dict[str, Any]:
        return {
            "model": model_state(wrapped),
            "model_config": model_config,
            "tokenizer": tokenizer.to_json(),
            "train_config": tcfg.model_dump(mode="json"),
            "optimizer": optimizer_state(wrapped, optimizer),
            "scheduler": scheduler.state_dict(),
            "step": step_now,
            "samples_seen": step_now * tcfg.batch_size,
            "data_state": state.to_dict(),
            "rng": rng_state(),
            "data_version": manifest.data_version,
        }

    def global_data_state(epoch: int, next_step_in_epoch: int) -> DataState:
        if next_step_in_epoch >= schedule.steps_per_epoch:
            return DataState(epoch=epoch + 1, step_in_epoch=0, positions=[0] * schedule.num_streams)
        mine = torch.zeros(schedule.num_streams, dtype=torch.long)
        for s in rank_streams:
            mine[s] = positions[s]
        all_reduce_(mine, info)  # every stream belongs to exactly one rank: the sum is the full vector
        return DataState(epoch=epoch, step_in_epoch=next_step_in_epoch, positions=[int(p) for p in mine.tolist()])

    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    params_for_tracking = {"train": tcfg.model_dump(mode="json"), "compute": cfg.compute.model_dump(mode="json"),
                           "world_size": info.world_size, "total_steps": schedule.total_steps}
    batches: Any = (batch for batch in ())  # a generator either way, so closing() below can stop the workers
    if start_step < schedule.total_steps:
        # Fork the DataLoader workers before the progress bar's refresh thread exists.
        batches = RankLoader(stream_cfg, tcfg.num_workers, pin_memory=info.device.type == "cuda").start()
    with tracker.run("train", params=params_for_tracking,
                     tags={"data_version": manifest.data_version, "resumed_from_step": str(start_step)}), \
            _progress(info.is_main, schedule.total_steps, start_step) as progress, \
            contextlib.closing(batches):  # loader workers stop with the loop, on errors too
        wrapped.forward_module.train()
        epoch_of_last = data_state.epoch
        if start_step < schedule.total_steps:
            wait_start = time.monotonic()
            for batch in batches:
                waited = time.monotonic() - wait_start
                window["wait"] += waited
                total_wait += waited
                step = batch.epoch * schedule.steps_per_epoch + batch.step_in_epoch + 1
                counters["corrupt_samples"] += batch.corrupt
                counters["truncated_shards"] += batch.truncated
                if isinstance(batch.images, list):
                    # decode_jpeg takes the encoded bytes on the CPU and decodes on `device` (nvjpeg)
                    images, failed = gpu_decode_batch(batch.images, image_size, info.device)
                    counters["corrupt_samples"] += failed
                else:
                    images = batch.images.to(info.device, non_blocking=True)
                tokens = batch.tokens.to(info.device, non_blocking=True)
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = wrapped.forward_module(images, tokens)
                    loss = loss_fn(out.image_features.float(), out.text_features.float(), out.logit_scale.float())
                if step in fault_steps:
                    loss = loss * float("nan")
                finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
                all_reduce_(finite, info, dist.ReduceOp.MIN)
                if bool(finite.item()):
                    loss.backward()
                    wrapped.sync_replicated_grads(info.world_size)
                    optimizer.step()
                    consecutive_nonfinite = 0
                    last_loss = float(loss.detach())
                    window["loss"] += last_loss
                    window["steps"] += 1
                else:
                    counters["nonfinite_steps"] += 1
                    consecutive_nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                for s, p in batch.positions.items():
                    positions[s] = p
                epoch_of_last = batch.epoch
                keys_log.write({"step": step, "keys": batch.keys})
                if consecutive_nonfinite >= tcfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{consecutive_nonfinite} consecutive non-finite losses (train.max_nonfinite_steps = "
                        f"{tcfg.max_nonfinite_steps}) at step {step}; stopped. The newest checkpoint in "
                        f"{tcfg.output} is the last good state: lower train.lr or check the data, then rerun to resume."
                    )

                window["seen"] += 1
                if step % tcfg.log_every == 0 or step == schedule.total_steps:
                    elapsed = max(1e-9, time.monotonic() - window["start"])
                    last_metrics = {
                        "loss": window["loss"] / window["steps"] if window["steps"] else float("nan"),
                        "lr": scheduler.get_last_lr()[0],
                        "logit_scale": float(out.logit_scale.detach()),
                        "samples_per_s": window["seen"] * tcfg.batch_size / elapsed,
                        "data_wait_fraction": min(1.0, window["wait"] / elapsed),
                        "peak_memory_mb": _peak_memory_mb(info.device),
                        "corrupt_samples": counters["corrupt_samples"],
                        "nonfinite_steps": counters["nonfinite_steps"],
                    }
                    tracker.log_metrics(last_metrics, step=step)
                    window = {"loss": 0.0, "steps": 0, "seen": 0, "wait": 0.0, "start": time.monotonic()}
                if progress is not None:
                    progress.update(progress.task_ids[0], completed=step,
                                    status=f"loss {last_loss:.3f}" if math.isfinite(last_loss) else "")
                if step % tcfg.checkpoint_every == 0 and step < schedule.total_steps:
                    state = global_data_state(batch.epoch, batch.step_in_epoch + 1)
                    if info.is_main or wrapped.kind == "fsdp":
                        ckpt = make_checkpoint(step, state)  # FSDP: every rank takes part in the gather
                        if info.is_main:
                            save_checkpoint(storage.join(tcfg.output, step_name(step)), ckpt, scfg)
                            prune_checkpoints(tcfg.output, tcfg.keep_checkpoints, scfg)
                    barrier(info)
                if step >= schedule.total_steps:
                    break
                if step_delay:
                    time.sleep(step_delay)
                wait_start = time.monotonic()
            del batches  # stops the workers

        # totals over ranks, for metrics
        totals = torch.tensor([counters["corrupt_samples"], counters["truncated_shards"]], dtype=torch.long)
        all_reduce_(totals, info)
        elapsed_loop = max(1e-9, time.monotonic() - loop_start)
        trained_steps = step - start_step
        final_uri = storage.join(tcfg.output, FINAL_NAME)
        if trained_steps > 0 or resume is None or found[0] != final_uri:  # type: ignore[index]
            state = global_data_state(epoch_of_last, schedule.steps_per_epoch)
            if info.is_main or wrapped.kind == "fsdp":
                ckpt = make_checkpoint(step, state)
                if info.is_main:
                    save_checkpoint(final_uri, ckpt, scfg)
        metrics = {
            "steps": step,
            "trained_steps_this_run": trained_steps,
            "resumed_from_step": start_step,
            "total_steps": schedule.total_steps,
            "samples_seen": step * tcfg.batch_size,
            "final_loss": last_loss,
            "corrupt_samples": int(totals[0]),
            "truncated_shards": int(totals[1]),
            "nonfinite_steps": counters["nonfinite_steps"],
            "samples_per_s": trained_steps * tcfg.batch_size / elapsed_loop,
            "data_wait_fraction": min(1.0, total_wait / elapsed_loop),
            "elapsed_s": time.monotonic() - started,
            "world_size": info.world_size,
            "data_version": manifest.data_version,
            "checkpoint": final_uri,
        }
        if info.is_main:
            tok_uri = storage.join(tcfg.output, TOKENIZER_NAME)
            if not storage.exists(tok_uri, scfg):
                storage.write_bytes(tok_uri, tokenizer.to_json().encode("utf-8"), scfg)
            storage.write_bytes(metrics_uri,
                                (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode("utf-8"), scfg)
            tracker.log_metrics({k: float(v) for k, v in metrics.items()
                                 if isinstance(v, int | float) and math.isfinite(float(v))}, step=step)
            _log_artifacts(tracker, tcfg.output, scfg)
        barrier(info)
    return metrics


def _log_artifacts(tracker: Any, output: str, scfg: Any) -> None:
    if not tracker.enabled:
        return
    names = (FINAL_NAME, TOKENIZER_NAME, METRICS_NAME)
    if "://" not in output:
        for name in names:
            tracker.log_artifact(os.path.join(output, name), "checkpoint")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            local = os.path.join(tmp, name)
            storage.download_file(storage.join(output, name), local, scfg)
            tracker.log_artifact(local, "checkpoint")


def load_final(output: str, scfg: Any = None) -> dict[str, Any]:
    """The `final.pt` dict of a finished run (for later stages)."""
    return load_checkpoint_dict(storage.join(output, FINAL_NAME), scfg)
