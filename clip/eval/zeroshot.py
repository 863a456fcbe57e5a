"""Zero-shot classification as the CLIP paper does it (section 3.1.4, prompt ensembling).

    classifier = class_embeddings(encoder, classes, templates)     # float32 [C, E], unit rows
    result = zeroshot_scores(encoder, extracted.embeddings, extracted.labels, classes, templates, metric="accuracy")

Per class every template is filled (`template.format(classname)`), embedded, L2-normalised; the class vector is
their mean, normalised again. Logits are `logit_scale * cos(image, class)`. The result carries the dataset's paper
metric (clip.eval.metrics.compute_metric: accuracy, mean per-class recall, 11-point mAP for the multi-label VOC
2007, ROC AUC for the binary Hateful Memes, the top-1/top-5 mean for Kinetics700) plus top-1, top-5 and mean
per-class recall for every single-label set, and the predictions (for confusion matrices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clip.eval.encoders import Encoder
from clip.eval.metrics import compute_metric, mean_per_class_recall, multi_hot, topk_accuracy

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(encoder: Encoder, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """float32 [C, E]: per class the re-normalised mean of its normalised prompt embeddings."""
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' where the class name goes: {bad[:3]}")
    if not classes:
        raise ValueError("zero-shot needs at least one class name")
    prompts = [template.format(name) for name in classes for template in templates]
    per_prompt = l2_normalise(encoder.encode_texts(prompts).astype(np.float32))
    per_prompt = per_prompt.reshape(len(classes), len(templates), -1)  # [C, T, E]
    return l2_normalise(per_prompt.mean(axis=1)).astype(np.float32)


@dataclass
class ZeroShotResult:
    metric: str  # the paper's metric kind for this dataset
    value: float  # its value
    logits: np.ndarray  # float32 [N, C]
    predictions: np.ndarray  # int64 [N] top-1 class (single-label sets)
    extra: dict[str, float] = field(default_factory=dict)  # top1, top5, mean_per_class (single-label)


def zeroshot_logits(image_embeddings: np.ndarray, classifier: np.ndarray, logit_scale: float) -> np.ndarray:
    """float32 [N, C]: `logit_scale * cos(image, class)`."""
    if len(image_embeddings) == 0:
        return np.zeros((0, len(classifier)), dtype=np.float32)
    return (np.float32(logit_scale) * l2_normalise(image_embeddings.astype(np.float32)) @ classifier.T).astype(np.float32)


def score(logits: np.ndarray, labels: Sequence, metric: str, num_classes: int) -> ZeroShotResult:
    """The paper metric plus top-1 / top-5 / mean per-class recall for `logits` [N, C] against `labels`."""
    predictions = np.argmax(logits, axis=1) if len(logits) else np.zeros(0, dtype=np.int64)
    multi = bool(len(labels)) and isinstance(labels[0], tuple | list)
    if len(labels) == 0:
        return ZeroShotResult(metric, float("nan"), logits, predictions, {})
    if multi:
        value = compute_metric(metric, logits, multi_hot(list(labels), num_classes))
        return ZeroShotResult(metric, value, logits, predictions, {})
    y = np.asarray(labels, dtype=np.int64)
    extra = {"top1": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5),
             "mean_per_class": mean_per_class_recall(logits, y)}
    return ZeroShotResult(metric, compute_metric(metric, logits, y), logits, predictions, extra)


def zeroshot_scores(encoder: Encoder, image_embeddings: np.ndarray, labels: Sequence, classes: Sequence[str],
                    templates: Sequence[str], metric: str = "accuracy") -> ZeroShotResult:
    """Zero-shot evaluation of images already embedded by `encoder` (clip.eval.features.extract)."""
    classifier = class_embeddings(encoder, classes, templates)
    logits = zeroshot_logits(image_embeddings, classifier, encoder.logit_scale)
    return score(logits, labels, metric, len(classes))
