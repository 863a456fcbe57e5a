"""The export stage: a training checkpoint -> a checked ONNX bundle (docs/formats.md "Export bundle").

    from clip.export import stage
    result = stage.run(cfg.export, storage=cfg.storage, compute=cfg.compute)
    result.bundle, result.metrics["image_min_cosine"]

Steps: resolve the checkpoint (clip.formats.checkpoint `resolve_checkpoint`: `export.checkpoint`, a file or a run
folder; null: the training run of the data version asked about, `train_run`, which pipelines/export.py resolves from
the data version latest.json names; a checkpoint there of another data version is refused), read it
(`read_checkpoint`) and build it strictly (clip.model `build_from_checkpoint`: its `model_config` must fit its
weights, its tokenizer the model), export both
towers (clip.export.onnx_export), run the parity gate (clip.export.parity) and only then publish the bundle
(clip.export.publish: a new version folder, then the top manifest switched to it): a failure anywhere, a crash
included, leaves an existing bundle served. The export runs on the CPU in float32
whatever `compute` says (the bundle's reference runtime is onnxruntime on the CPU); `tracking` is accepted for the
common stage shape: the figures go to the stage metrics and the bundle manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clip import storage as storage_lib
from clip.config import ComputeConfig, ExportConfig, StorageConfig, TrackingConfig
from clip.export.onnx_export import export_image_encoder, export_text_encoder
from clip.export.parity import ParityThresholds, check_parity, parity_info
from clip.export.publish import model_card, publish_bundle
from clip.export.quantize import quantize_image_encoder
from clip.formats.bundle import (
    BUNDLE_MANIFEST_NAME,
    IMAGE_ENCODER_NAME,
    INT8_IMAGE_ENCODER_NAME,
    MODEL_CARD_NAME,
    PREPROCESS_NAME,
    TEXT_ENCODER_NAME,
    TOKENIZER_NAME,
    bundle_files_location,
)
from clip.formats.checkpoint import (
    MLFLOW_RUN_KEY,
    CheckpointFile,
    TrainedRun,
    read_checkpoint,
    resolve_checkpoint,
)
from clip.formats.errors import FormatError
from clip.model import CLIP, build_from_checkpoint
from clip.progress import Progress
from clip.result import StageResult
from clip.tokenizer import Tokenizer
from clip.tracking import Tracker
from clip.transforms import describe_transforms

TASK = "export"
STEPS = ("loading checkpoint", "exporting image encoder", "exporting text encoder", "parity gate", "publishing")
TIMING_KEYS = ("load_s", "export_image_s", "export_text_s", "parity_s", "publish_s")
Tamper = Callable[[str, bytes], bytes]  # (bundle file name, ONNX bytes) -> bytes; test hook, see export_bundle


@dataclass(kw_only=True)
class ExportResult(StageResult):
    """metrics: parity figures per tower, sizes, timings; outputs: `bundle`, `manifest` (the top one, the pointer),
    `files` (the version folder published); bundle: its location;
    info: the manifest's `info` (what evaluation and promotion read)."""

    bundle: str
    info: dict[str, Any]


@dataclass
class LoadedCheckpoint:
    """The checkpoint exported: as read (`file`: where from, its sha256, its content) and built."""

    file: CheckpointFile
    model: CLIP
    tokenizer: Tokenizer


def checkpoint_to_export(cfg: ExportConfig, storage_cfg: StorageConfig | None,
                         train_run: TrainedRun | None = None) -> str:
    """The checkpoint file to export (clip.formats.checkpoint `resolve_checkpoint`): `export.checkpoint` when set,
    else `train_run`'s, the run of the data version asked about (never the newest file: after latest.json moved
    back to an older version, the newest run is the other version's)."""
    if cfg.checkpoint is not None:
        return resolve_checkpoint(cfg.checkpoint, storage_cfg, "export.checkpoint")
    if train_run is None:
        raise ValueError("export.checkpoint is null and no training run was named: set export.checkpoint, or run "
                         "the export stage through pipelines/export.py (the run of the data version latest.json names)")
    return resolve_checkpoint(train_run, storage_cfg, "export.checkpoint")


def load_for_export(uri: str, storage_cfg: StorageConfig | None) -> LoadedCheckpoint:
    """Read (clip.formats.checkpoint) and build (clip.model) the checkpoint at `uri`, float32 on the CPU; one-line
    errors name `uri`."""
    file = read_checkpoint(uri, storage_cfg, key="export.checkpoint")
    model, tokenizer = build_from_checkpoint(file.content, uri)
    return LoadedCheckpoint(file=file, model=model.float().eval(), tokenizer=tokenizer)


def bundle_info(ckpt: LoadedCheckpoint, parity: dict[str, Any]) -> dict[str, Any]:
    model, data = ckpt.model, ckpt.file.content
    return {
        "model": model.config.name,
        "model_config": data["model_config"],
        "embed_dim": model.config.embed_dim,
        "image_size": model.config.vision.image_size,
        "context_length": model.context_length,
        "logit_scale": float(model.scale().detach()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data_version": data.get("data_version"),
        "train_run_id": data.get(MLFLOW_RUN_KEY),
        "train_step": data.get("step"),
        "checkpoint": ckpt.file.uri,
        "checkpoint_sha256": ckpt.file.sha256,
        "parity": parity,
    }


def export_bundle(cfg: ExportConfig, storage_cfg: StorageConfig, progress: Progress | None = None,
                  tamper: Tamper | None = None, train_run: TrainedRun | None = None) -> ExportResult:
    """The stage's work (`train_run`: see `checkpoint_to_export`). `tamper` (tests only) may alter an exported
    model's bytes before the parity gate."""
    timings: dict[str, float] = {}
    tick = time.monotonic()

    def step(index: int) -> None:
        nonlocal tick
        now = time.monotonic()
        if index > 0:
            timings[TIMING_KEYS[index - 1]] = round(now - tick, 3)
        tick = now
        if progress is not None:
            progress(TASK, index, len(STEPS), STEPS[index] if index < len(STEPS) else "done")

    step(0)
    ckpt = load_for_export(checkpoint_to_export(cfg, storage_cfg, train_run), storage_cfg)
    trained_on = ckpt.file.content.get("data_version")
    if train_run is not None and cfg.checkpoint is None and trained_on != train_run.data_version:
        raise FormatError(f"{ckpt.file.uri} was trained on data version {str(trained_on)[:12]}, "
                          f"not on {train_run.data_version[:12]}, the version asked about: train it, or set "
                          "export.checkpoint")
    step(1)
    image_onnx = export_image_encoder(ckpt.model, cfg.opset)
    step(2)
    text_onnx = export_text_encoder(ckpt.model, cfg.opset)
    if tamper is not None:
        image_onnx = tamper(IMAGE_ENCODER_NAME, image_onnx)
        text_onnx = tamper(TEXT_ENCODER_NAME, text_onnx)
    step(3)
    thresholds = ParityThresholds(min_cosine=cfg.parity_min_cosine, max_abs_diff=cfg.parity_max_abs_diff)
    report = check_parity(ckpt.model, ckpt.tokenizer, image_onnx, text_onnx, thresholds, seed=cfg.parity_seed)
    report.raise_if_failed()
    step(4)
    info = bundle_info(ckpt, parity_info(report, thresholds))
    contents = {
        IMAGE_ENCODER_NAME: image_onnx,
        TEXT_ENCODER_NAME: text_onnx,
        TOKENIZER_NAME: ckpt.file.content["tokenizer"].encode("utf-8"),
        PREPROCESS_NAME: (json.dumps(describe_transforms(ckpt.model.config.vision.image_size), indent=2, sort_keys=True) + "\n").encode(),
        MODEL_CARD_NAME: model_card(info).encode("utf-8"),
    }
    if cfg.int8:  # beside the float encoder, never instead of it; its size, speed and differences reported
        quantized = quantize_image_encoder(image_onnx, seed=cfg.parity_seed)
        contents[INT8_IMAGE_ENCODER_NAME] = quantized.model
        info["int8"] = quantized.report
        timings.update({key: value for key, value in quantized.report.items() if isinstance(value, int | float)})
    published = publish_bundle(cfg.output_dir, contents, info, storage_cfg)
    step(5)
    metrics: dict[str, Any] = {
        **report.figures,
        **timings,
        "model": info["model"],
        "parameters": info["parameters"],
        "checkpoint": ckpt.file.uri,
        "data_version": info["data_version"],
        "image_encoder_bytes": len(image_onnx),
        "text_encoder_bytes": len(text_onnx),
        "bundle": cfg.output_dir,
        "bundle_version": published.version,
    }
    outputs = {"bundle": cfg.output_dir, "manifest": storage_lib.join(cfg.output_dir, BUNDLE_MANIFEST_NAME),
               "files": bundle_files_location(cfg.output_dir, published)}
    return ExportResult(metrics=metrics, outputs=outputs, bundle=cfg.output_dir, info=info)


def run(
    cfg: ExportConfig, *, storage: StorageConfig, compute: ComputeConfig, tracking: TrackingConfig | None = None,
    progress: Progress | None = None, train_run: TrainedRun | None = None,
) -> ExportResult:
    """Export, check and publish; raises (one line, naming the input) without writing anything on bad input or a
    failed parity gate. `train_run`: the run to export when `export.checkpoint` is null (`checkpoint_to_export`).
    With tracking: an MLflow run with the parity figures, sizes and timings as metrics, the lineage as tags (data
    version, training run, checkpoint sha256) and the model card as an artifact."""
    result = export_bundle(cfg, storage, progress, train_run=train_run)
    tracker = Tracker(tracking) if tracking is not None else None
    if tracker is not None and tracker.enabled:
        info = result.info
        with tracker.run("export", params={"export": cfg.model_dump(mode="json")},
                         tags={"data_version": info.get("data_version"), "train_run_id": info.get("train_run_id"),
                               "checkpoint_sha256": info.get("checkpoint_sha256"), "model": info.get("model")}):
            tracker.log_metrics({key: float(value) for key, value in result.metrics.items()
                                 if isinstance(value, int | float) and not isinstance(value, bool)})
            card = storage_lib.read_bytes(storage_lib.join(result.outputs["files"], MODEL_CARD_NAME), storage)
            tracker.log_bytes(card, f"bundle/{MODEL_CARD_NAME}")
    return result
