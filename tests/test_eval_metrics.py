"""The paper's metrics against answers computed by hand (the arithmetic is in each test's comments)."""

from __future__ import annotations

import numpy as np
import pytest

from clip.eval.metrics import (
    METRICS,
    compute_metric,
    eleven_point_ap,
    map_11point,
    mean_per_class_recall,
    roc_auc,
    topk_accuracy,
)
from clip.evalsets import METRIC_KINDS


def one_hot_scores(predicted: list[int], num_classes: int) -> np.ndarray:
    scores = np.zeros((len(predicted), num_classes))
    scores[np.arange(len(predicted)), predicted] = 1.0
    return scores


def test_accuracy_and_mean_per_class_recall() -> None:
    labels = [0, 0, 0, 1, 1, 2]
    scores = one_hot_scores([0, 0, 1, 1, 0, 2], 3)
    assert topk_accuracy(scores, labels) == pytest.approx(4 / 6)
    # Recall: class 0 2/3, class 1 1/2, class 2 1/1 -> mean (2/3 + 1/2 + 1) / 3 = 13/18.
    assert mean_per_class_recall(scores, labels) == pytest.approx(13 / 18)
    assert compute_metric("mean_per_class", scores, labels) == pytest.approx(0.7222222)


def test_topk_and_kinetics_mean() -> None:
    # Scores rank classes 0 > 1 > ... > 6 for every sample.
    scores = np.tile(np.arange(7, 0, -1, dtype=float), (4, 1))
    labels = [0, 3, 4, 6]  # ranks 1, 4, 5, 7
    assert topk_accuracy(scores, labels, 1) == 0.25
    assert topk_accuracy(scores, labels, 5) == 0.75
    assert compute_metric("top1_top5_mean", scores, labels) == pytest.approx(0.5)


def test_ties_go_to_the_lower_class_index() -> None:
    assert topk_accuracy(np.zeros((2, 3)), [0, 1]) == 0.5


def test_eleven_point_ap_by_hand() -> None:
    # Ranked by score: +, -, +, -. Precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1.
    # Levels 0..0.5 (6 of them): best precision at recall >= t is 1; levels 0.6..1.0 (5): 2/3.
    # AP = (6 * 1 + 5 * 2/3) / 11 = 28/33.
    assert eleven_point_ap([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(28 / 33)
    # The only positive ranked last of 4: precision 1/4 at recall 1, for all 11 levels.
    assert eleven_point_ap([0.9, 0.8, 0.7, 0.1], [0, 0, 0, 1]) == pytest.approx(0.25)


def test_map_11point_averages_classes_with_positives() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.5], [0.6, 0.4, 0.5]])
    targets = [(0,), (), (0,), (1,)]  # class 2 has no positive: left out of the mean
    # Class 0: 28/33 (above). Class 1: its positive has the top score -> AP 1. mAP = (28/33 + 1) / 2 = 61/66.
    assert map_11point(scores, targets) == pytest.approx(61 / 66)
    multi_hot = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    assert compute_metric("map_11point", scores, multi_hot) == pytest.approx(61 / 66)


def test_roc_auc_by_hand() -> None:
    # Positives score 0.8 and 0.4, negatives 0.5 and 0.1: pairs won 0.8>0.5, 0.8>0.1, 0.4>0.1; lost 0.4<0.5 -> 3/4.
    assert roc_auc([0.8, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    # A tie counts half: positive 0.5 vs negative 0.5 -> 1/2; with positive 0.9 > 0.5 -> (1 + 1/2) / 2 = 3/4.
    assert roc_auc([0.5, 0.9, 0.5], [1, 1, 0]) == pytest.approx(0.75)
    # Two-column logits are scored by logit1 - logit0: [2-0, 0-1, 1-1] = [2, -1, 0] for labels [1, 0, 0] -> 1.
    assert compute_metric("roc_auc", [[0, 2], [1, 0], [1, 1]], [1, 0, 0]) == 1.0


def test_metric_kinds_agree_with_the_registry_and_bad_input_is_refused() -> None:
    assert set(METRICS) == set(METRIC_KINDS)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("f1", np.zeros((1, 2)), [0])
    with pytest.raises(ValueError, match="2 labels for 1 rows"):
        topk_accuracy(np.zeros((1, 2)), [0, 1])
    with pytest.raises(ValueError, match="binary"):
        roc_auc(np.zeros((2, 3)), [0, 1])
