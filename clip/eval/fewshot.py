"""Few-shot linear probes and how many shots zero-shot is worth (the CLIP paper's Figures 6 and 7).

    points = few_shot_curve(train_x, train_y, test_x, test_y, num_classes=10, metric="accuracy",
                            shots=[1, 2, 4, 8, 16], seeds=[0, 1, 2])
    match = shots_to_match(points, zeroshot_value)      # Match(shots=3.4, text="3.4")

What was chosen, and why:
- **The draw.** For a seed, each class's training images are put in a random order (numpy's
  `default_rng(seed)`, classes in index order) and the first k are taken. The same seed gives the same draw; for
  one seed the k-shot sets are nested (the 4-shot set holds the 2-shot set), so a curve's steps are the images
  added, not a fresh draw. Only the train split is drawn from, and the features are those the full probe uses
  (the stage's cached extraction): few-shot costs no encoder pass.
- **Classes with fewer than k training images are capped**: they give all they have, and the point says how many
  classes were capped and the fewest images among them (`capped=` in the row's details), so a "16-shot" figure
  that is really "16 or fewer" is never silent.
- **C (the inverse L2 strength).** The paper's A.3 search (clip.eval.probe.parametric_search, the dataset's
  metric) on a held-out part of the k-shot set: per class its last max(1, round(k/5)) drawn images (k = 2: 1,
  4: 1, 8: 2, 16: 3), never a class's only image; the chosen C is refit on all k images and scored on test.
  With k = 1 there is nothing to hold out, so C = FIXED_C = 1 (L2 strength 1: scikit-learn's default and the
  middle of the paper's grid). With one image per class a regularised logistic regression is close to a
  class-mean (prototype) classifier, whose predictions change little with C.
- **Mean and spread** over the seeds: the mean, the sample standard deviation (ddof 1; 0 with one seed), and each
  draw's figure.
- **Shots to match zero-shot** (Figure 7): the first k whose mean reaches the zero-shot figure, interpolated
  linearly in log2(k) between it and the k before. Outside the measured range it is a bound, not a number:
  "<=1" when the smallest k already reaches zero-shot, ">16" when the largest does not.
Multi-label sets (VOC 2007) are refused: "k images per class" needs one class per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clip.eval import probe

FIXED_C = 1.0  # k = 1: no held-out part to search C on


@dataclass(frozen=True)
class Draw:
    indices: np.ndarray  # int64 positions in the training set, class by class, each class in drawn order
    capped: dict[int, int]  # class -> the images it had, for classes with fewer than k


def draw_k_shot(labels: np.ndarray, k: int, seed: int, num_classes: int) -> Draw:
    """k training images per class (all of a class's images when it has fewer), drawn with `seed`."""
    if k < 1:
        raise ValueError(f"few-shot k must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    parts, capped = [], {}
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        order = rng.permutation(members)  # drawn even when capped: the next class's order stays the same
        if len(members) < k:
            capped[c] = len(members)
        parts.append(order[:k])
    return Draw(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64), capped)


def held_out_split(drawn_labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit positions, held-out positions) in a draw: per class its last max(1, round(k/5)) images, never its
    only one. Empty held-out part for k = 1."""
    per_class = max(1, int(k * probe.VAL_FRACTION + 0.5)) if k > 1 else 0
    fit_part, held_out = [], []
    for c in np.unique(drawn_labels):  # a draw lists each class's images together
        positions = np.flatnonzero(drawn_labels == c)
        n_val = min(per_class, len(positions) - 1)
        fit_part.append(positions[:len(positions) - n_val])
        held_out.append(positions[len(positions) - n_val:])
    return np.concatenate(fit_part).astype(np.int64), np.concatenate(held_out).astype(np.int64)


@dataclass(frozen=True)
class FewShotPoint:
    shots: int
    mean: float  # the dataset's metric on test, mean over the draws
    spread: float  # sample standard deviation over the draws (0 with one draw)
    values: tuple[float, ...]  # one per seed, in seed order
    cs: tuple[float, ...]  # the C each draw's probe used
    searched: bool  # C from the search on a held-out part (else FIXED_C)
    capped_classes: int  # classes with fewer than `shots` training images
    fewest_images: int | None  # the fewest training images of a capped class

    def details(self) -> str:
        cs = ",".join(f"{c:.3g}" for c in self.cs)
        text = (f"k={self.shots} std={self.spread:.4f} draws={len(self.values)} "
                f"C={cs}{'' if self.searched else ' (fixed)'}")
        if self.capped_classes:
            text += f" capped={self.capped_classes} classes (fewest {self.fewest_images} images)"
        return text


def few_shot_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, k: int,
                   seed: int, num_classes: int, metric: str = "accuracy",
                   workers: int | None = 1) -> tuple[float, float, bool, Draw]:
    """One k-shot probe: (test figure, C used, whether C was searched, the draw)."""
    draw = draw_k_shot(train_y, k, seed, num_classes)
    shot_x, shot_y = train_x[draw.indices], train_y[draw.indices]
    fit_pos, val_pos = held_out_split(shot_y, k)
    if len(val_pos) == 0:
        value = probe.fit_and_score(shot_x, shot_y, test_x, test_y, c=FIXED_C, num_classes=num_classes,
                                    metric=metric)
        return value, FIXED_C, False, draw
    result = probe.linear_probe(shot_x[fit_pos], shot_y[fit_pos], test_x, test_y, num_classes=num_classes,
                                metric=metric, val=(shot_x[val_pos], shot_y[val_pos]), workers=workers)
    return result.value, result.c, True, draw


def few_shot_curve(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   num_classes: int, metric: str = "accuracy", shots: Sequence[int] = (1, 2, 4, 8, 16),
                   seeds: Sequence[int] = (0, 1, 2), workers: int | None = 1) -> list[FewShotPoint]:
    """A k-shot probe for every k of `shots` and seed of `seeds`; one point per k (ascending)."""
    if train_y.ndim != 1:
        raise ValueError("few-shot probes need single-label classes; this set is multi-label")
    if not seeds:
        raise ValueError("few-shot probes need at least one seed")
    points = []
    for k in sorted(set(shots)):
        runs = [few_shot_probe(train_x, train_y, test_x, test_y, k=k, seed=seed, num_classes=num_classes,
                               metric=metric, workers=workers) for seed in seeds]
        values = tuple(run[0] for run in runs)
        capped = runs[0][3].capped  # the same for every seed: it depends on the class sizes only
        points.append(FewShotPoint(
            shots=k, mean=float(np.mean(values)), spread=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            values=values, cs=tuple(run[1] for run in runs), searched=runs[0][2], capped_classes=len(capped),
            fewest_images=min(capped.values()) if capped else None))
    return points


@dataclass(frozen=True)
class Match:
    shots: float | None  # interpolated shots per class; None outside the measured range
    text: str  # the number, or the bound ("<=1", ">16"), or "n/a" without a zero-shot figure


def shots_to_match(points: Sequence[FewShotPoint], zeroshot: float | None) -> Match:
    """The shots per class a linear probe needs to match `zeroshot` (log2-linear interpolation)."""
    curve = sorted((p.shots, p.mean) for p in points if math.isfinite(p.mean))
    if zeroshot is None or not math.isfinite(zeroshot) or not curve:
        return Match(None, "n/a")
    if curve[0][1] >= zeroshot:
        return Match(None, f"<={curve[0][0]}")
    for (k0, m0), (k1, m1) in zip(curve, curve[1:], strict=False):
        if m1 >= zeroshot:
            t = (zeroshot - m0) / (m1 - m0)  # m0 < zeroshot <= m1, so 0 < t <= 1
            shots = 2.0 ** (math.log2(k0) + t * (math.log2(k1) - math.log2(k0)))
            return Match(shots, f"{shots:.2f}")
    return Match(None, f">{curve[-1][0]}")
