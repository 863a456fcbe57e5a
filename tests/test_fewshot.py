"""Few-shot linear probes (clip.eval.fewshot) on features whose answer is known, the shots that match zero-shot,
the stage's few-shot rows and plot, and the probe search's thread limit (clip.eval.probe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from clip.config import EvaluateConfig
from clip.eval import fewshot, probe
from clip.formats.results import RESULTS_JSON, ResultRow, ResultsTable
from tests.test_eval_stage import checkpoint, run, section  # noqa: F401 - checkpoint is a fixture

REPO = Path(__file__).resolve().parents[1]


def gaussian_classes(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes in turn around fixed, well-apart centres (the same centres for every `seed`)."""
    centres = np.random.default_rng(100).normal(size=(classes, dim)) * 5
    labels = np.arange(n) % classes
    features = centres[labels] + noise * np.random.default_rng(seed).normal(size=(n, dim))
    return features.astype(np.float32), labels


def xor_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes no hyperplane separates: class = sign(x0) == sign(x1), six noise dimensions beside."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 8))
    features[:, :2] = rng.choice([-2.0, 2.0], size=(n, 2)) + 0.3 * rng.normal(size=(n, 2))
    labels = (np.sign(features[:, 0]) == np.sign(features[:, 1])).astype(np.int64)
    return features.astype(np.float32), labels


def test_one_shot_is_near_perfect_when_classes_are_linearly_separable() -> None:
    train_x, train_y = gaussian_classes(100, 5, 16, noise=0.3, seed=1)
    test_x, test_y = gaussian_classes(200, 5, 16, noise=0.3, seed=2)
    points = fewshot.few_shot_curve(train_x, train_y, test_x, test_y, num_classes=5, shots=[1, 4], seeds=[0, 1])
    assert [p.shots for p in points] == [1, 4]
    assert all(p.mean >= 0.98 and len(p.values) == 2 for p in points)
    one, four = points
    assert not one.searched and one.cs == (fewshot.FIXED_C,) * 2  # k = 1: nothing to hold out
    assert four.searched and all(c in {probe.grid_c(k) for k in range(-48, 49)} for c in four.cs)


def test_probe_stays_at_chance_when_classes_are_not_linearly_separable() -> None:
    train_x, train_y = xor_classes(200, seed=1)
    test_x, test_y = xor_classes(400, seed=2)
    points = fewshot.few_shot_curve(train_x, train_y, test_x, test_y, num_classes=2, shots=[1, 16], seeds=[0, 1])
    assert all(0.35 <= p.mean <= 0.65 for p in points), [p.mean for p in points]
    # The same images with the product feature that separates them: the probe itself is not the limit.
    def lifted(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, x[:, :1] * x[:, 1:2]], axis=1)

    separable = fewshot.few_shot_curve(lifted(train_x), train_y, lifted(test_x), test_y, num_classes=2, shots=[16],
                                       seeds=[0])
    assert separable[0].mean >= 0.95


def test_same_seed_same_draw_and_seeds_differ() -> None:
    labels = np.arange(60) % 3
    first = fewshot.draw_k_shot(labels, 4, seed=7, num_classes=3)
    np.random.seed(123)
    np.random.rand(10)  # global random state moved: a draw must not depend on it
    assert np.array_equal(fewshot.draw_k_shot(labels, 4, seed=7, num_classes=3).indices, first.indices)
    draws = [tuple(fewshot.draw_k_shot(labels, 4, seed=s, num_classes=3).indices) for s in range(5)]
    assert len(set(draws)) == 5  # a draw that ignores the seed gives one draw five times
    assert np.array_equal(np.bincount(labels[first.indices]), [4, 4, 4]) and first.capped == {}
    two = fewshot.draw_k_shot(labels, 2, seed=7, num_classes=3).indices
    assert set(two) <= set(first.indices)  # for one seed the k-shot sets are nested

    train_x, train_y = xor_classes(60, seed=1)
    test_x, test_y = xor_classes(200, seed=2)
    curve = [fewshot.few_shot_curve(train_x, train_y, test_x, test_y, num_classes=2, shots=[2], seeds=seeds)[0]
             for seeds in ([0, 1, 2], [0, 1, 2], [3, 4, 5])]
    assert curve[0].values == curve[1].values and curve[0].values != curve[2].values


def test_held_out_part_of_the_draw() -> None:
    drawn = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])  # class 2 was capped at one image
    fit_part, held_out = fewshot.held_out_split(drawn, 4)
    assert held_out.tolist() == [3, 7] and fit_part.tolist() == [0, 1, 2, 4, 5, 6, 8]  # never a class's only one
    fit_part, held_out = fewshot.held_out_split(np.repeat([0, 1], 16), 16)
    assert held_out.tolist() == [13, 14, 15, 29, 30, 31]  # round(16 / 5) = 3 per class
    assert fewshot.held_out_split(np.array([0, 1, 2]), 1)[1].size == 0


def test_search_picks_c_on_the_held_out_part_of_the_draw() -> None:
    train_x, train_y = gaussian_classes(120, 4, 8, noise=6.0, seed=1)
    test_x, test_y = gaussian_classes(200, 4, 8, noise=6.0, seed=2)
    value, c, searched, draw = fewshot.few_shot_probe(train_x, train_y, test_x, test_y, k=8, seed=3, num_classes=4)
    # By hand: per class the last 2 of its 8 drawn images are held out, C searched there, refit on all 8.
    blocks = draw.indices.reshape(4, 8)
    expected = probe.linear_probe(train_x[blocks[:, :6].ravel()], train_y[blocks[:, :6].ravel()], test_x, test_y,
                                  num_classes=4, val=(train_x[blocks[:, 6:].ravel()], train_y[blocks[:, 6:].ravel()]))
    assert searched and (value, c) == (expected.value, expected.c)


def test_classes_with_fewer_than_k_images_are_capped_and_said() -> None:
    train_x, train_y = gaussian_classes(60, 3, 8, noise=0.3, seed=1)
    keep = np.ones(len(train_y), dtype=bool)
    keep[np.flatnonzero(train_y == 0)[3:]] = False  # class 0 keeps 3 images
    train_x, train_y = train_x[keep], train_y[keep]
    draw = fewshot.draw_k_shot(train_y, 8, seed=0, num_classes=3)
    assert draw.capped == {0: 3} and np.bincount(train_y[draw.indices]).tolist() == [3, 8, 8]
    test_x, test_y = gaussian_classes(60, 3, 8, noise=0.3, seed=2)
    (point,) = fewshot.few_shot_curve(train_x, train_y, test_x, test_y, num_classes=3, shots=[8], seeds=[0])
    assert (point.capped_classes, point.fewest_images) == (1, 3)
    assert "capped=1 classes (fewest 3 images)" in point.details()


def test_shots_to_match_interpolates_in_log2_shots() -> None:
    def curve(*means: float) -> list[fewshot.FewShotPoint]:
        return [fewshot.FewShotPoint(2 ** i, m, 0.0, (m,), (1.0,), True, 0, None) for i, m in enumerate(means)]

    points = curve(0.2, 0.4, 0.8)  # k = 1, 2, 4
    assert fewshot.shots_to_match(points, 0.6).shots == pytest.approx(2 ** 1.5)  # halfway from 2 to 4 in log2
    assert fewshot.shots_to_match(points, 0.4).shots == pytest.approx(2.0)
    assert fewshot.shots_to_match(points, 0.1) == fewshot.Match(None, "<=1")
    assert fewshot.shots_to_match(points, 0.9) == fewshot.Match(None, ">4")
    assert fewshot.shots_to_match(curve(0.5, 0.3, 0.7), 0.6).shots == pytest.approx(2 ** 1.75)  # first crossing


def test_few_shot_config_is_checked() -> None:
    assert EvaluateConfig().few_shot == []  # off by default
    with pytest.raises(ValueError, match="evaluate.few_shot repeats a value"):
        EvaluateConfig(few_shot=[1, 2, 2])
    with pytest.raises(ValueError, match="evaluate.few_shot_seeds is empty"):
        EvaluateConfig(few_shot=[1], few_shot_seeds=[])


def test_stage_reports_few_shot_rows_matching_shots_and_plot(tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    cfg = section(tmp_path, checkpoint, linear_probe=False, few_shot=[1, 2, 8], few_shot_seeds=[0, 1], plots=True)
    result = run(cfg)
    rows = {row.label: row for row in result.table.rows}
    assert sorted(rows) == ["few_shot_1", "few_shot_2", "few_shot_8", "zeroshot"]
    assert [rows[f"few_shot_{k}"].shots for k in (1, 2, 8)] == [1, 2, 8]
    assert all(0 <= rows[f"few_shot_{k}"].value <= 1 and rows[f"few_shot_{k}"].spread >= 0 for k in (1, 2, 8))
    assert "capped=6 classes (fewest 4 images)" in rows["few_shot_8"].details  # 24 images, 6 classes
    assert "shots_to_match=" in rows["zeroshot"].details
    assert result.metrics["synthetic-shapes/few_shot_2"] == rows["few_shot_2"].value
    assert result.table.mean == rows["zeroshot"].value  # the few-shot curve is not averaged in
    written = ResultsTable.from_json_bytes((tmp_path / "eval" / RESULTS_JSON).read_bytes())
    assert written == result.table
    assert (tmp_path / "eval" / "few_shot.png").read_bytes()[:4] == b"\x89PNG"


def test_results_v1_files_still_load_and_few_shot_rows_render() -> None:
    v1 = {"format": "clip-pipeline/eval-results/v1", "mean": 0.5,
          "rows": [{"dataset": "cifar10", "task": "zeroshot", "metric": "accuracy", "value": 0.5, "samples": 10,
                    "status": "ok", "note": "", "skipped": 0, "details": ""}]}
    (row,) = ResultsTable.from_json_bytes(json.dumps(v1).encode()).rows
    assert row.shots is None and row.matching_shots is None
    table = ResultsTable((row, ResultRow("cifar10", "few_shot", "accuracy", 0.25, 10, shots=4, spread=0.05)))
    assert table.mean == 0.5 and "| cifar10 | few_shot k=4 | accuracy | 0.2500 ± 0.0500 |" in table.to_markdown()


# -- the probe search's threads (issue 25 part 5) --------------------------------------------------------------


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] in ("blas", "openmp")]


def test_parallel_search_fits_run_with_one_blas_thread() -> None:
    seen: list[list[int]] = []

    def score_at(c: float) -> float:
        seen.append(blas_threads())
        return -abs(np.log10(c))

    with threadpool_limits(limits=3):  # a BLAS pool of several threads, whatever the machine's core count
        before = blas_threads()
        result = probe.parametric_search(score_at, workers=2)
        assert blas_threads() == before  # restored after the search
    assert result.best_c == 1.0 and len(seen) >= 7
    assert before and all(n > 1 for n in before)
    assert all(threads and set(threads) == {1} for threads in seen), seen


def test_fit_workers_follow_the_cpus_this_process_may_use() -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from clip.eval.probe import fit_workers; print(fit_workers(8), fit_workers(None))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "1"]
