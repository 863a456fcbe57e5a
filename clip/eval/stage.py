"""The evaluation stage: zero-shot, linear-probe and retrieval scores of one model -> reports/eval/.

    clip-pipeline evaluate                                        # the export bundle on evaluate.datasets
    clip-pipeline evaluate --datasets cifar10,mnist --root DIR    # real datasets under DIR
    clip-pipeline evaluate --set evaluate.checkpoint=models/runs/tiny-vit-0123456789ab/final.pt

For every key of `evaluate.datasets` (after expanding `synthetic` to the built-in sets):
- a registry dataset (clip.evalsets.registry, the CLIP paper's 27): if its folder under `data_root` is
  absent, its rows are listed as skipped with the path looked for (never dropped); else zero-shot on its test
  split with its templates and paper metric, (evaluate.linear_probe) a linear probe fitted on train (+ val), and
  (evaluate.few_shot) k-shot probes on the same cached train features, one row per k (mean and spread over
  evaluate.few_shot_seeds draws), with the shots a probe needs to match zero-shot on the zero-shot row
  (`matching_shots`; clip.eval.fewshot).
  A folder that exists but is malformed (a missing, truncated or refused file: the loaders name it) fails that
  dataset only: its rows are listed with `status: failed` and the reason in `note`, the other datasets are still
  scored and the report written, and then `run` raises DatasetsFailedError (the CLI exits 1) so the failure is
  never mistaken for a complete evaluation.
- `flickr30k` / `coco`: image<->text recall@1/5/10 on the Karpathy test split (one row, the mean recall;
  the six recalls in its details and in the metrics).
- a built-in synthetic set (clip.eval.synthetic_sets): always there; the demo's report is never empty.
- a natural distribution shift set (imagenetv2, imagenet_sketch, imagenet_r, imagenet_a, objectnet;
  clip.evalsets.imagenet_shifts): zero-shot only, with ImageNet's class vectors restricted to the set's classes
  (clip.eval.robustness), absent ones skipped like the others. After the datasets, summary rows: each set's
  effective robustness against the (approximate) ImageNet-trained baseline, which needs `imagenet` evaluated in
  the same run, and the mean over the sets (`imagenet_shifts`), plus `shift.png`.
Images go through clip.eval.features (threaded decoding ahead of the encoder, features cached per model, dataset
and split); the model is the export bundle (evaluate.bundle, onnxruntime: what ships is what is measured) unless
evaluate.checkpoint names a PyTorch checkpoint. Results: clip.eval.report (table + plots) under
evaluate.output_dir; metrics `<dataset>/<task>` (`<dataset>/few_shot_<k>`) plus `mean` and `zeroshot_mean`, also logged to an MLflow run
(metrics, the table through `log_table`, the plots; tagged with the model's data version) when `tracking` is enabled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from clip.compute import resolve_device
from clip.config import ComputeConfig, EvaluateConfig, StorageConfig, TrackingConfig
from clip.eval import fewshot, probe, retrieval, robustness, synthetic_sets, zeroshot
from clip.eval.encoders import Encoder, load_encoder
from clip.eval.features import Extracted, cached_extract
from clip.eval.report import Confusion, write_report
from clip.formats.bundle import MODEL_CARD_NAME, bundle_file_uri, fill_model_card, read_bundle_manifest
from clip.formats.checkpoint import checkpoint_data_version, resolve_checkpoint
from clip.formats.results import RESULTS_JSON, SUMMARY_TASKS, ResultRow, ResultsTable
from clip.progress import Progress, for_task
from clip.result import StageResult

log = logging.getLogger(__name__)
ZEROSHOT, LINEAR_PROBE, FEW_SHOT, RETRIEVAL = "zeroshot", "linear_probe", "few_shot", "retrieval"


@dataclass
class EvalResult(StageResult):
    table: ResultsTable | None = None
    images_per_second: float = 0.0


class DatasetsFailedError(RuntimeError):
    """Some datasets could not be loaded or scored; the others' results were written. `result` holds them all."""

    def __init__(self, result: EvalResult, failed: dict[str, str], results_uri: str):
        reasons = "; ".join(f"{key} ({reason})" for key, reason in failed.items())
        super().__init__(f"{len(failed)} dataset(s) could not be evaluated: {reasons}; the results of the others "
                         f"are in {results_uri}")
        self.result, self.failed = result, failed


class _Evaluation:
    """The state of one run: config, encoder, rows, confusions, timing."""

    def __init__(self, cfg: EvaluateConfig, encoder: Encoder, storage: StorageConfig, progress: Progress | None):
        self.cfg, self.encoder, self.storage, self.progress = cfg, encoder, storage, progress
        self.rows: list[ResultRow] = []
        self.failed: dict[str, str] = {}  # dataset key -> why it could not be evaluated
        self.first_error: Exception | None = None  # chained to DatasetsFailedError: its traceback under debug
        self.metrics: dict[str, Any] = {}
        self.confusions: list[Confusion] = []
        self.images, self.seconds = 0, 0.0
        self.imagenet_classifier: robustness.ImageNetClassifier | None = None  # shared by the shift sets

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
        """Zero-shot on `test`; the linear probe on train (+ val when the dataset has it); k-shot probes on train."""
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
        probes = [task for task in (LINEAR_PROBE, FEW_SHOT) if self.enabled(task)]
        if not probes:
            return
        if "train" not in splits:
            for task in probes:
                self.add(ResultRow(key, task, metric, None, status="skipped", note="no train split"))
            return
        num_classes = len(test_set.classes)
        train = self.extract(load_split("train"))
        if self.enabled(LINEAR_PROBE):
            self.linear_probe(key, metric, load_split, splits, train, test, num_classes)
        if self.enabled(FEW_SHOT):
            self.few_shot(key, metric, train, test, num_classes)

    def linear_probe(self, key: str, metric: str, load_split, splits: tuple[str, ...], train: Extracted,
                     test: Extracted, num_classes: int) -> None:
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

    def few_shot(self, key: str, metric: str, train: Extracted, test: Extracted, num_classes: int) -> None:
        """k-shot probes on the train features already extracted; the shots that match zero-shot go on the
        dataset's zero-shot row (added before, so a failure here keeps it)."""
        if test.multi_label:
            self.add(ResultRow(key, FEW_SHOT, metric, None, status="skipped",
                               note="multi-label set: a k-shot draw needs one class per image"))
            return
        points = fewshot.few_shot_curve(train.features, train.label_array(num_classes), test.features,
                                        test.label_array(num_classes), num_classes=num_classes, metric=metric,
                                        shots=self.cfg.few_shot, seeds=self.cfg.few_shot_seeds,
                                        workers=self.cfg.probe_workers)
        for point in points:
            self.add(ResultRow(key, FEW_SHOT, metric, point.mean, len(test.labels), skipped=train.skipped,
                               details=point.details(), shots=point.shots, spread=point.spread))
            self.metrics[f"{key}/{FEW_SHOT}_{point.shots}/spread"] = point.spread
        index = next(i for i, row in enumerate(self.rows) if row.dataset == key and row.task == ZEROSHOT)
        zs = self.rows[index]
        match = fewshot.shots_to_match(points, zs.value)
        self.rows[index] = replace(zs, matching_shots=match.shots,
                                   details=f"{zs.details} shots_to_match={match.text}".strip())
        if match.shots is not None:
            self.metrics[f"{key}/{ZEROSHOT}/matching_shots"] = match.shots

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
            self.skip(key, entry.metric, entry.path(self.cfg.data_root), tasks=_metric_and_tasks(key)[1])
            return
        self.classification(key, entry.metric, lambda split: entry.load(self.cfg.data_root, split), entry.splits)

    def shift(self, key: str) -> None:
        """A distribution shift set: zero-shot over its ImageNet classes (clip.eval.robustness), no probes."""
        from clip.evalsets.registry import get_dataset

        entry = get_dataset(key)
        if not entry.available(self.cfg.data_root):
            self.skip(key, entry.metric, entry.path(self.cfg.data_root), tasks=(ZEROSHOT,))
            return
        shift_set = entry.load(self.cfg.data_root, "test")
        test = self.extract(shift_set)
        if self.imagenet_classifier is None:
            self.imagenet_classifier = robustness.ImageNetClassifier(self.encoder)
        scored = robustness.score_shift_set(shift_set, test, self.imagenet_classifier, self.encoder.logit_scale)
        details = f"top1={scored.accuracy:.4f} top5={scored.top5:.4f} classes={scored.classes}"
        if shift_set.partial:
            details += f" partial copy: {shift_set.partial}"
        self.add(ResultRow(key, ZEROSHOT, entry.metric, scored.accuracy, len(test.labels), skipped=test.skipped,
                           details=details))

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

    def enabled(self, task: str) -> bool:
        """Whether evaluate.* asks for `task` (the probes are optional)."""
        return {LINEAR_PROBE: self.cfg.linear_probe, FEW_SHOT: bool(self.cfg.few_shot)}.get(task, True)

    def add(self, row: ResultRow) -> None:
        self.rows.append(row)
        if row.status == "ok":
            self.metrics[f"{row.dataset}/{row.label}"] = row.value

    def skip(self, key: str, metric: str, path, tasks: tuple[str, ...]) -> None:
        for task in tasks:
            if not self.enabled(task):
                continue
            self.rows.append(ResultRow(key, task, metric, None, status="skipped", note=f"no data at {path}"))
        log.warning("evaluate: %s skipped: no data at %s", key, path)

    def fail(self, key: str, exc: Exception) -> None:
        """A `failed` row for each of the dataset's tasks that has no row yet (a zero-shot score computed before
        its train split turned out broken is kept)."""
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line: it goes into a table cell
        self.failed[key] = reason
        self.first_error = self.first_error or exc
        metric, tasks = _metric_and_tasks(key)
        done = {row.task for row in self.rows if row.dataset == key}
        for task in tasks:
            if task not in done and self.enabled(task):
                self.rows.append(ResultRow(key, task, metric, None, status="failed", note=reason))
        # Bad input (our own error classes) is fully said by its message; anything else may be a bug: traceback.
        log.error("evaluate: %s failed: %s", key, reason, exc_info=type(exc).__module__.split(".")[0] != "clip")


def _metric_and_tasks(key: str) -> tuple[str, tuple[str, ...]]:
    """The metric and tasks of a dataset key; ValueError for a key that names no dataset."""
    if synthetic_sets.is_synthetic(key):
        return "accuracy", (ZEROSHOT, LINEAR_PROBE, FEW_SHOT)
    if key in retrieval.RETRIEVAL_SETS:
        return "mean_recall", (RETRIEVAL,)
    from clip.evalsets.registry import get_dataset

    if _is_shift_set(key):
        return get_dataset(key).metric, (ZEROSHOT,)

    return get_dataset(key).metric, (ZEROSHOT, LINEAR_PROBE, FEW_SHOT)


def _is_shift_set(key: str) -> bool:
    from clip.evalsets.registry import list_shift_datasets

    return key in list_shift_datasets()


def _device(compute: ComputeConfig) -> str:
    return resolve_device(compute.device).type  # cuda without a GPU: one line naming compute.device


def run(section: EvaluateConfig, *, storage: StorageConfig, compute: ComputeConfig,
        tracking: TrackingConfig | None = None, progress: Progress | None = None) -> EvalResult:
    """Evaluate the bundle (or checkpoint) on every dataset of `section.datasets`; write the report."""
    keys = synthetic_sets.expand_names(list(section.datasets))
    if not keys:
        raise ValueError("evaluate.datasets is empty: name at least one dataset (or 'synthetic')")
    for key in keys:  # an unknown name is a config mistake: refused before any work, not a failed dataset
        _metric_and_tasks(key)
    start = time.monotonic()
    device = _device(compute) if section.checkpoint else "cpu"
    # a run folder means its checkpoint by clip.formats.checkpoint's one rule (export follows it too)
    checkpoint = resolve_checkpoint(section.checkpoint, storage, "evaluate.checkpoint") if section.checkpoint else None
    encoder = load_encoder(section.bundle, checkpoint, storage, device=device)
    # the data version of the model evaluated: every stage's record (metrics, MLflow run) names the one it is about
    data_version = (checkpoint_data_version(checkpoint, storage, "evaluate.checkpoint") if checkpoint
                    else read_bundle_manifest(section.bundle, storage).info.get("data_version"))
    evaluation = _Evaluation(section, encoder, storage, progress)
    for done, key in enumerate(keys):
        if progress is not None:
            progress("evaluate: datasets", done, len(keys), key)
        try:
            if synthetic_sets.is_synthetic(key):
                evaluation.synthetic(key)
            elif key in retrieval.RETRIEVAL_SETS:
                evaluation.retrieval(key)
            elif _is_shift_set(key):
                evaluation.shift(key)
            else:
                evaluation.registry(key)
        except Exception as exc:  # noqa: BLE001 - one broken dataset must not discard the others' results
            evaluation.fail(key, exc)
    if progress is not None:
        progress("evaluate: datasets", len(keys), len(keys), "")
    for row in robustness.summary_rows(evaluation.rows):  # the shift sets' mean and effective robustness
        evaluation.add(row)
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
        "datasets_evaluated": len({r.dataset for r in table.rows if r.status == "ok" and r.task not in SUMMARY_TASKS}),
        "datasets_skipped": len({r.dataset for r in table.rows if r.status == "skipped"
                                 and r.task not in SUMMARY_TASKS}),
        "datasets_failed": len(evaluation.failed),
        "images_per_second": speed,
        "model": encoder.name,
        "model_fingerprint": encoder.fingerprint,
        "data_version": data_version,
        "seconds": time.monotonic() - start,
    }
    _track(tracking, section, table, metrics, outputs, storage)
    result = EvalResult(metrics=metrics, outputs=outputs, table=table, images_per_second=speed)
    if evaluation.failed:
        raise DatasetsFailedError(result, evaluation.failed, outputs.get(RESULTS_JSON, section.output_dir)
                                  ) from evaluation.first_error
    return result


def _write_model_card(section: EvaluateConfig, table: ResultsTable, storage: StorageConfig) -> str:
    from clip import storage as storage_lib

    card = storage_lib.read_bytes(bundle_file_uri(section.bundle, MODEL_CARD_NAME, storage), storage).decode("utf-8")
    uri = storage_lib.join(section.output_dir, MODEL_CARD_NAME)
    storage_lib.write_bytes(uri, fill_model_card(card, table.to_markdown()).encode("utf-8"), storage)
    return uri


def _track(tracking: TrackingConfig | None, section: EvaluateConfig, table: ResultsTable, metrics: dict[str, Any],
           outputs: dict[str, str], storage: StorageConfig) -> None:
    """One MLflow run: every per-dataset figure as a metric (the compare view lines runs up), the results table
    (`log_table`), the plots and the Markdown table as artifacts, the model fingerprint and data version as tags."""
    from dataclasses import asdict

    from clip import storage as storage_lib
    from clip.tracking import Tracker

    tracker = Tracker(tracking) if tracking is not None else None
    if tracker is None or not tracker.enabled:
        return
    numbers = {key.replace("@", "_at_"): float(value) for key, value in metrics.items()
               if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)}
    with tracker.run("evaluate", params={"evaluate": section.model_dump(mode="json")},
                     tags={"model": metrics.get("model"), "model_fingerprint": metrics.get("model_fingerprint"),
                           "data_version": metrics.get("data_version")}):
        tracker.log_metrics(numbers)
        rows = [asdict(row) for row in table.rows]
        tracker.log_table({name: [row[name] for row in rows] for name in (rows[0] if rows else {})},
                          "eval/results.json")
        for name, uri in sorted(outputs.items()):
            if name.endswith(".png") or name.endswith(".md"):
                tracker.log_bytes(storage_lib.read_bytes(uri, storage), f"eval/{name}")
