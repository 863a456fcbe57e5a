"""The evaluation stage: zero-shot, linear-probe and retrieval scores of one model -> reports/eval/.

    clip-pipeline evaluate                                        # the export bundle on evaluate.datasets
    clip-pipeline evaluate --datasets cifar10,mnist --root DIR    # real datasets under DIR
    clip-pipeline evaluate --set evaluate.checkpoint=models/runs/tiny-vit-0123456789ab/final.pt

For every key of `evaluate.datasets` (after expanding `synthetic` to the built-in sets):
- a registry dataset (clip.evalsets.registry, the CLIP paper's 27): if its folder under `data_root` is
  absent, its rows are listed as skipped with the path looked for (never dropped); else zero-shot on its test
  split with its templates and paper metric, and (evaluate.linear_probe) a linear probe fitted on train (+ val).
  A folder that exists but is malformed is an error naming the file expected (the loaders raise it).
- `flickr30k` / `coco`: image<->text recall@1/5/10 on the Karpathy test split (one row, the mean recall;
  the six recalls in its details and in the metrics).
- a built-in synthetic set (clip.eval.synthetic_sets): always there; the demo's report is never empty.
Images go through clip.eval.features (threaded decoding ahead of the encoder, features cached per model, dataset
and split); the model is the export bundle (evaluate.bundle, onnxruntime: what ships is what is measured) unless
evaluate.checkpoint names a PyTorch checkpoint. Results: clip.eval.report (table + plots) under
evaluate.output_dir; metrics `<dataset>/<task>` plus `mean` and `zeroshot_mean`, also logged to an MLflow run
(metrics, the table through `log_table`, the plots) when `tracking` is enabled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip.config import ComputeConfig, EvaluateConfig, StorageConfig, TrackingConfig
from clip.eval import probe, retrieval, synthetic_sets, zeroshot
from clip.eval.encoders import Encoder, load_encoder
from clip.eval.features import Extracted, cached_extract
from clip.eval.report import Confusion, write_report
from clip.formats.bundle import MODEL_CARD_NAME, fill_model_card
from clip.formats.results import ResultRow, ResultsTable
from clip.progress import Progress, for_task
from clip.result import StageResult

log = logging.getLogger(__name__)
ZEROSHOT, LINEAR_PROBE, RETRIEVAL = "zeroshot", "linear_probe", "retrieval"


@dataclass
class EvalResult(StageResult):
    table: ResultsTable | None = None
    images_per_second: float = 0.0


class _Evaluation:
    """The state of one run: config, encoder, rows, confusions, timing."""

    def __init__(self, cfg: EvaluateConfig, encoder: Encoder, storage: StorageConfig, progress: Progress | None):
        self.cfg, self.encoder, self.storage, self.progress = cfg, encoder, storage, progress
        self.rows: list[ResultRow] = []
        self.metrics: dict[str, Any] = {}
        self.confusions: list[Confusion] = []
        self.images, self.seconds = 0, 0.0

    def extract(self, evalset) -> Extracted:
        extracted = cached_extract(
            self.encoder, evalset, cache_dir=self.cfg.cache_dir, storage_cfg=self.storage,
            batch_size=self.cfg.batch_size, workers=self.cfg.workers,
            progress=for_task(self.progress, f"evaluate: {evalset.key} {evalset.split}"))
        if extracted.seconds > 0:
            self.images += extracted.total
            self.seconds += extracted.seconds
        return extracted

    # -- classification sets ---------------------------------------------------------------------------------

    def classification(self, key: str, metric: str, load_split, splits: tuple[str, ...]) -> None:
        """Zero-shot on `test`; the linear probe on train (+ val when the dataset has it)."""
        test_set = load_split("test")
        test = self.extract(test_set)
        result = zeroshot.zeroshot_scores(self.encoder, test.embeddings, test.labels, test_set.classes,
                                          test_set.templates, metric)
        details = " ".join(f"{name}={value:.4f}" for name, value in result.extra.items())
        self.add(ResultRow(key, ZEROSHOT, metric, result.value, len(test.labels), skipped=test.skipped,
                           details=details))
        for name, value in result.extra.items():
            self.metrics[f"{key}/{ZEROSHOT}/{name}"] = value
        if not test.multi_label and len(test.labels) and len(test_set.classes) <= 20:
            self.confusions.append(Confusion(key, list(test_set.classes), np.asarray(test.labels, dtype=np.int64),
                                             result.predictions.astype(np.int64)))
        if not self.cfg.linear_probe:
            return
        if "train" not in splits:
            self.add(ResultRow(key, LINEAR_PROBE, metric, None, status="skipped", note="no train split"))
            return
        num_classes = len(test_set.classes)
        train = self.extract(load_split("train"))
        val = None
        if "val" in splits:
            val_extracted = self.extract(load_split("val"))
            val = (val_extracted.features, val_extracted.label_array(num_classes))
        fitted = probe.linear_probe(train.features, train.label_array(num_classes), test.features,
                                    test.label_array(num_classes), num_classes=num_classes, metric=metric, val=val,
                                    workers=self.cfg.probe_workers)
        details = (f"C={fitted.c:.3g} val={fitted.val_score:.4f} train={fitted.train_samples} "
                   f"val_samples={fitted.val_samples} fits={fitted.fits}")
        self.add(ResultRow(key, LINEAR_PROBE, metric, fitted.value, fitted.test_samples, skipped=train.skipped,
                           details=details))
        self.metrics[f"{key}/{LINEAR_PROBE}/C"] = fitted.c

    def synthetic(self, key: str) -> None:
        def load_split(split: str):
            return synthetic_sets.synthetic_set(key, split, n=self.cfg.synthetic_samples,
                                                image_size=self.encoder.image_size, seed=self.cfg.synthetic_seed,
                                                heldout_fraction=self.cfg.synthetic_heldout_fraction)

        self.classification(key, "accuracy", load_split, synthetic_sets.SPLITS)

    def registry(self, key: str) -> None:
        from clip.evalsets.registry import get_dataset

        entry = get_dataset(key)
        if not entry.available(self.cfg.data_root):
            self.skip(key, entry.metric, entry.path(self.cfg.data_root), tasks=(ZEROSHOT, LINEAR_PROBE))
            return
        self.classification(key, entry.metric, lambda split: entry.load(self.cfg.data_root, split), entry.splits)

    # -- retrieval -------------------------------------------------------------------------------------------

    def retrieval(self, key: str) -> None:
        if not retrieval.retrieval_available(self.cfg.data_root, key):
            self.skip(key, "mean_recall", retrieval.retrieval_path(self.cfg.data_root, key), tasks=(RETRIEVAL,))
            return
        captions = retrieval.load_captions(self.cfg.data_root, key, "test")
        images = self.extract(captions.images)
        kept = np.asarray(images.labels, dtype=np.int64)  # original image indices that decoded
        remap = np.full(len(captions.images), -1, dtype=np.int64)
        remap[kept] = np.arange(len(kept))
        keep_text = remap[captions.text_to_image] >= 0
        texts = [t for t, keep in zip(captions.texts, keep_text, strict=True) if keep]
        text_embeddings = self.encoder.encode_texts(texts)
        recalls = retrieval.retrieval_recalls(images.embeddings, text_embeddings,
                                              remap[captions.text_to_image[keep_text]])
        details = " ".join(f"{name}={value:.4f}" for name, value in recalls.items() if name != "mean_recall")
        self.add(ResultRow(key, RETRIEVAL, "mean_recall", recalls["mean_recall"], len(kept), skipped=images.skipped,
                           details=details))
        for name, value in recalls.items():
            self.metrics[f"{key}/{RETRIEVAL}/{name}"] = value

    # -- rows ------------------------------------------------------------------------------------------------

    def add(self, row: ResultRow) -> None:
        self.rows.append(row)
        if row.status == "ok":
            self.metrics[f"{row.dataset}/{row.task}"] = row.value

    def skip(self, key: str, metric: str, path, tasks: tuple[str, ...]) -> None:
        for task in tasks:
            if task == LINEAR_PROBE and not self.cfg.linear_probe:
                continue
            self.rows.append(ResultRow(key, task, metric, None, status="skipped", note=f"no data at {path}"))
        log.warning("evaluate: %s skipped: no data at %s", key, path)


def _device(compute: ComputeConfig) -> str:
    if compute.device != "auto":
        return compute.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(section: EvaluateConfig, *, storage: StorageConfig, compute: ComputeConfig,
        tracking: TrackingConfig | None = None, progress: Progress | None = None) -> EvalResult:
    """Evaluate the bundle (or checkpoint) on every dataset of `section.datasets`; write the report."""
    keys = synthetic_sets.expand_names(list(section.datasets))
    if not keys:
        raise ValueError("evaluate.datasets is empty: name at least one dataset (or 'synthetic')")
    start = time.monotonic()
    device = _device(compute) if section.checkpoint else "cpu"
    encoder = load_encoder(section.bundle, section.checkpoint, storage, device=device)
    evaluation = _Evaluation(section, encoder, storage, progress)
    for done, key in enumerate(keys):
        if progress is not None:
            progress("evaluate: datasets", done, len(keys), key)
        if synthetic_sets.is_synthetic(key):
            evaluation.synthetic(key)
        elif key in retrieval.RETRIEVAL_SETS:
            evaluation.retrieval(key)
        else:
            evaluation.registry(key)
    if progress is not None:
        progress("evaluate: datasets", len(keys), len(keys), "")
    table = ResultsTable(rows=tuple(evaluation.rows))
    outputs = write_report(section.output_dir, table, evaluation.confusions, storage, plots=section.plots)
    if not section.checkpoint:  # the bundle's model card with its evaluation section filled, beside the results
        outputs[MODEL_CARD_NAME] = _write_model_card(section, table, storage)
    zeroshot_values = [r.value for r in table.rows if r.task == ZEROSHOT and r.status == "ok" and r.value is not None]
    speed = evaluation.images / evaluation.seconds if evaluation.seconds > 0 else 0.0
    metrics: dict[str, Any] = {
        **evaluation.metrics,
        "mean": table.mean,
        "zeroshot_mean": float(np.mean(zeroshot_values)) if zeroshot_values else None,
        "datasets_evaluated": len({r.dataset for r in table.rows if r.status == "ok"}),
        "datasets_skipped": len({r.dataset for r in table.rows if r.status == "skipped"}),
        "images_per_second": speed,
        "model": encoder.name,
        "model_fingerprint": encoder.fingerprint,
        "seconds": time.monotonic() - start,
    }
    _track(tracking, section, table, metrics, outputs, storage)
    return EvalResult(metrics=metrics, outputs=outputs, table=table, images_per_second=speed)


def _write_model_card(section: EvaluateConfig, table: ResultsTable, storage: StorageConfig) -> str:
    from clip import storage as storage_lib

    card = storage_lib.read_bytes(storage_lib.join(section.bundle, MODEL_CARD_NAME), storage).decode("utf-8")
    uri = storage_lib.join(section.output_dir, MODEL_CARD_NAME)
    storage_lib.write_bytes(uri, fill_model_card(card, table.to_markdown()).encode("utf-8"), storage)
    return uri


def _track(tracking: TrackingConfig | None, section: EvaluateConfig, table: ResultsTable, metrics: dict[str, Any],
           outputs: dict[str, str], storage: StorageConfig) -> None:
    """One MLflow run: every per-dataset figure as a metric (the compare view lines runs up), the results table
    (`log_table`), the plots and the Markdown table as artifacts, the model fingerprint as a tag."""
    from dataclasses import asdict

    from clip import storage as storage_lib
    from clip.tracking import Tracker

    tracker = Tracker(tracking) if tracking is not None else None
    if tracker is None or not tracker.enabled:
        return
    numbers = {key.replace("@", "_at_"): float(value) for key, value in metrics.items()
               if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)}
    with tracker.run("evaluate", params={"evaluate": section.model_dump(mode="json")},
                     tags={"model": metrics.get("model"), "model_fingerprint": metrics.get("model_fingerprint")}):
        tracker.log_metrics(numbers)
        rows = [asdict(row) for row in table.rows]
        tracker.log_table({name: [row[name] for row in rows] for name in (rows[0] if rows else {})},
                          "eval/results.json")
        for name, uri in sorted(outputs.items()):
            if name.endswith(".png") or name.endswith(".md"):
                tracker.log_bytes(storage_lib.read_bytes(uri, storage), f"eval/{name}")
