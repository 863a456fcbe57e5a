"""The metrics the CLIP paper reports (Table 9 / appendix A), from scores and labels; numpy and scikit-learn only.

`scores` is (N, C): any per-class score where higher means more likely (logits, cosine similarities,
probabilities; the metrics only use their order). `labels` is (N,) class indices, or for the multi-label VOC
2007 a multi-hot (N, C) array or a sequence of index tuples.

- `accuracy`: top-1 accuracy (`topk_accuracy` for any k). Ties go to the lower class index (numpy's stable sort).
- `mean_per_class`: the mean over classes of per-class recall (top-1), over the classes that occur in `labels`
  (FGVC Aircraft, Oxford-IIIT Pets, Caltech-101, Oxford Flowers 102).
- `map_11point`: VOC 2007's 11-point interpolated average precision, averaged over classes: for each recall level
  t in 0, 0.1, ..., 1 the best precision at any recall >= t (0 if the class never reaches t), then the mean of the
  11. Classes without a positive sample are left out of the mean. Equal scores are ranked in sample order.
- `roc_auc`: area under the ROC curve of a binary task (Hateful Memes), scored by `scores[:, 1] - scores[:, 0]`
  (the same order as softmax p(class 1)) or by a 1-D score; scikit-learn's `roc_auc_score` (ties count half).
- `top1_top5_mean`: Kinetics700's (top-1 + top-5) / 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("accuracy", "mean_per_class", "map_11point", "roc_auc", "top1_top5_mean")


def _scores(scores) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"scores must be (samples, classes), got shape {array.shape}")
    return array


def _labels(labels, n: int) -> np.ndarray:
    array = np.asarray(labels, dtype=np.int64).reshape(-1)
    if array.shape[0] != n:
        raise ValueError(f"{array.shape[0]} labels for {n} rows of scores")
    return array


def topk_accuracy(scores, labels, k: int = 1) -> float:
    """Fraction of samples whose label is among the k highest scores."""
    s = _scores(scores)
    y = _labels(labels, s.shape[0])
    if s.shape[0] == 0:
        return float("nan")
    k = min(k, s.shape[1])
    # Stable descending order: among equal scores the lower class index ranks first.
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def per_class_recall(scores, labels) -> dict[int, float]:
    """{class: top-1 recall} over the classes that occur in `labels`."""
    s = _scores(scores)
    y = _labels(labels, s.shape[0])
    predicted = np.argmax(s, axis=1)
    return {int(c): float(np.mean(predicted[y == c] == c)) for c in np.unique(y)}


def mean_per_class_recall(scores, labels) -> float:
    recalls = per_class_recall(scores, labels)
    return float(np.mean(list(recalls.values()))) if recalls else float("nan")


def multi_hot(labels, num_classes: int) -> np.ndarray:
    """(N, C) 0/1 targets from a multi-hot array or a sequence of class-index tuples."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        return (labels > 0).astype(np.int8)
    targets = np.zeros((len(labels), num_classes), dtype=np.int8)
    for row, classes in enumerate(labels):
        indices = [classes] if np.isscalar(classes) else list(classes)
        targets[row, indices] = 1
    return targets


def eleven_point_ap(class_scores, positives) -> float:
    """VOC 2007 11-point interpolated AP of one class: `class_scores` (N,), `positives` (N,) 0/1."""
    scores = np.asarray(class_scores, dtype=np.float64)
    positive = np.asarray(positives).astype(bool)
    total = int(positive.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / total
    levels = np.linspace(0.0, 1.0, 11)
    return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in levels]))


def map_11point(scores, labels) -> float:
    """Mean over classes (with at least one positive) of the 11-point interpolated AP."""
    s = _scores(scores)
    targets = multi_hot(labels, s.shape[1])
    if targets.shape != s.shape:
        raise ValueError(f"multi-label targets {targets.shape} do not match scores {s.shape}")
    aps = [eleven_point_ap(s[:, c], targets[:, c]) for c in range(s.shape[1]) if targets[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def roc_auc(scores, labels) -> float:
    from sklearn.metrics import roc_auc_score

    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 2:
        if array.shape[1] != 2:
            raise ValueError(f"roc_auc is for binary tasks: scores have {array.shape[1]} classes")
        array = array[:, 1] - array[:, 0]
    y = _labels(labels, array.shape[0])
    if len(np.unique(y)) < 2:
        return float("nan")  # undefined with one class present
    return float(roc_auc_score(y, array))


def top1_top5_mean(scores, labels) -> float:
    return (topk_accuracy(scores, labels, 1) + topk_accuracy(scores, labels, 5)) / 2


def compute_metric(kind: str, scores, labels: Sequence | np.ndarray) -> float:
    """The paper's metric `kind` (one of METRICS; the registry's `DatasetEntry.metric`)."""
    if kind == "accuracy":
        return topk_accuracy(scores, labels, 1)
    if kind == "mean_per_class":
        return mean_per_class_recall(scores, labels)
    if kind == "map_11point":
        return map_11point(scores, labels)
    if kind == "roc_auc":
        return roc_auc(scores, labels)
    if kind == "top1_top5_mean":
        return top1_top5_mean(scores, labels)
    raise ValueError(f"unknown metric kind {kind!r}; known: {', '.join(METRICS)}")
