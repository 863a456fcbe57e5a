"""Linear probes as in the CLIP paper's appendix A.3.

    result = linear_probe(train_x, train_y, test_x, test_y, num_classes=10, metric="accuracy", val=(val_x, val_y))

The paper: "We use scikit-learn's L-BFGS implementation, with maximum 1,000 iterations, and determine the L2
regularization strength λ using a hyperparameter sweep on the validation sets over the range between 10^-6 and
10^6, with 96 logarithmically spaced steps. To save compute required for the sweeps, we perform a parametric
binary search that starts with λ = [10^-6, 10^-4, 10^-2, 1, 10^2, 10^4, 10^6] and iteratively halves the interval
around the peak until it reaches a resolution of 8 steps per decade."

So the candidate grid is C = 10^(k/8), k = -48..48 (scikit-learn's C is the inverse strength; the range is
symmetric, so the grid is the same). `parametric_search` scores the seven coarse points (every 16th), then
halves the step around the best point (8, 4, 2, 1 grid steps): 15 fits instead of 97. Ties go to the smaller C
(stronger regularisation), here and in `brute_force_search`, so the two agree whenever the validation curve is
unimodal on the grid. Selection uses the dataset's paper metric on the validation split (the dataset's own val
split, else a deterministic 20% of train); the chosen C is then refit on train + val and scored on test.
Features are the image features before the projection, float32, as extracted (no rescaling: the paper names
none). Multi-label sets (VOC 2007) get one binary probe per class (one-vs-rest).

Threads: the search's fits run in a thread pool of `fit_workers()` threads (the requested number, at most the
CPUs this process may use, os.sched_getaffinity), and while they do, every BLAS and OpenMP pool is limited to one
thread (threadpoolctl). Without the limit each parallel fit starts a full BLAS pool and the pools fight over the
cores: one L-BFGS fit took 52.7 s instead of 0.35 s on a loaded 2-core box (scikit-learn's known
oversubscription). A single fit (the refit, a sequential search) keeps the libraries' own thread counts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from clip.eval.metrics import compute_metric

STEPS_PER_DECADE = 8
MIN_EXPONENT, MAX_EXPONENT = -6 * STEPS_PER_DECADE, 6 * STEPS_PER_DECADE  # grid index k: C = 10^(k/8)
COARSE_STEP = 2 * STEPS_PER_DECADE  # the paper's starting points, two decades apart
VAL_FRACTION = 0.2


def grid_c(k: int) -> float:
    return float(10.0 ** (k / STEPS_PER_DECADE))


@dataclass
class SearchResult:
    best_k: int
    best_score: float
    evaluated: dict[int, float] = field(default_factory=dict)  # grid index -> validation score

    @property
    def best_c(self) -> float:
        return grid_c(self.best_k)


def _best(scores: dict[int, float]) -> int:
    # Highest score; ties to the smaller C. NaN counts as the worst.
    return max(scores, key=lambda k: (-np.inf if np.isnan(scores[k]) else scores[k], -k))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def fit_workers(requested: int | None = None) -> int:
    """Fits to run at once: `requested` (None: one per CPU), never more than the CPUs available."""
    return max(1, min(requested or available_cpus(), available_cpus()))


def _single_threaded(score_at: Callable[[float], float], c: float) -> float:
    from threadpoolctl import threadpool_limits

    # Inside the worker thread too: OpenMP's thread count is per calling thread, so the caller's limit does not
    # reach it (the BLAS limit is process-wide and already 1 here; restoring it on exit restores 1).
    with threadpool_limits(limits=1):
        return score_at(c)


def parallel_map(score_at: Callable[[float], float], cs: list[float], workers: int) -> list[float]:
    """`score_at` over `cs`, `workers` at a time, each with one BLAS / OpenMP thread; in order."""
    if workers <= 1 or len(cs) <= 1:
        return [score_at(c) for c in cs]
    from threadpoolctl import threadpool_limits

    # Process-wide BLAS limit for the whole pool: limiting inside each thread alone would race (one thread's exit
    # restores the full pool while another still fits).
    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe-fit") as pool:
        return list(pool.map(lambda c: _single_threaded(score_at, c), cs))


def parametric_search(score_at: Callable[[float], float], workers: int = 1) -> SearchResult:
    """The paper's parametric binary search over C = 10^(k/8), k in [-48, 48]; `score_at(C)`: higher is better.
    `workers` > 1: that many fits at once, each limited to one BLAS thread."""
    evaluated: dict[int, float] = {}

    def evaluate(ks: list[int]) -> None:
        todo = [k for k in ks if k not in evaluated and MIN_EXPONENT <= k <= MAX_EXPONENT]
        values = parallel_map(score_at, [grid_c(k) for k in todo], workers)
        evaluated.update(zip(todo, (float(v) for v in values), strict=True))

    evaluate(list(range(MIN_EXPONENT, MAX_EXPONENT + 1, COARSE_STEP)))
    best, step = _best(evaluated), COARSE_STEP
    while step > 1:
        step //= 2
        evaluate([best - step, best + step])
        neighbourhood = {k: evaluated[k] for k in (best - step, best, best + step) if k in evaluated}
        best = _best(neighbourhood)
    return SearchResult(best, evaluated[best], evaluated)


def brute_force_search(score_at: Callable[[float], float], ks: list[int] | None = None) -> SearchResult:
    """Score every grid point (or the given grid indices) and keep the best, same tie rule."""
    ks = list(range(MIN_EXPONENT, MAX_EXPONENT + 1)) if ks is None else ks
    evaluated = {k: float(score_at(grid_c(k))) for k in ks}
    best = _best(evaluated)
    return SearchResult(best, evaluated[best], evaluated)


# -- fitting --------------------------------------------------------------------------------------------------


def fit(features: np.ndarray, labels: np.ndarray, c: float, multi_label: bool):
    """scikit-learn LogisticRegression(L-BFGS, max_iter=1000, L2 strength 1/C); one-vs-rest for multi-label."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    model = LogisticRegression(C=c, solver="lbfgs", max_iter=1000)
    if multi_label:
        model = OneVsRestClassifier(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # extreme C values: the last iterate is still scored
        model.fit(features, labels)
    return model


def class_scores(model, features: np.ndarray, num_classes: int, multi_label: bool) -> np.ndarray:
    """float64 [N, C] decision scores with a column per class of the dataset (absent from train: -inf-like)."""
    raw = np.asarray(model.decision_function(features), dtype=np.float64)
    if multi_label:
        return raw.reshape(len(features), -1)
    classes = np.asarray(model.classes_)
    if raw.ndim == 1:  # binary: the score of classes_[1]
        raw = np.stack([-raw, raw], axis=1)
    scores = np.full((len(features), num_classes), -1e9, dtype=np.float64)
    scores[:, classes] = raw
    return scores


def deterministic_split(n: int, fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a seeded permutation, the same for the same n every time."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction))) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class ProbeResult:
    metric: str
    value: float  # the paper metric on test
    c: float  # the chosen inverse L2 strength
    val_score: float
    fits: int  # models fitted in the search
    train_samples: int
    val_samples: int
    test_samples: int


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, c: float,
                  num_classes: int, metric: str = "accuracy") -> float:
    """Fit one probe at inverse L2 strength `c` and return `metric` on test."""
    multi = train_y.ndim == 2
    model = fit(train_x, train_y, c, multi)
    return float(compute_metric(metric, class_scores(model, test_x, num_classes, multi), test_y))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 num_classes: int, metric: str = "accuracy",
                 val: tuple[np.ndarray, np.ndarray] | None = None, workers: int | None = 1) -> ProbeResult:
    """Search C on val (or a deterministic split of train), refit on train + val, score `metric` on test.
    `workers`: fits at once during the search (None: one per available CPU; capped at the CPUs either way)."""
    if val is None:
        tr, va = deterministic_split(len(train_x))
        fit_x, fit_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    else:
        fit_x, fit_y, (val_x, val_y) = train_x, train_y, val
    if len(fit_x) == 0 or len(val_x) == 0 or len(test_x) == 0:
        raise ValueError(f"linear probe needs train, val and test samples; got {len(fit_x)}, {len(val_x)}, "
                         f"{len(test_x)}")

    def score_at(c: float) -> float:
        return fit_and_score(fit_x, fit_y, val_x, val_y, c=c, num_classes=num_classes, metric=metric)

    search = parametric_search(score_at, workers=fit_workers(workers))
    value = fit_and_score(np.concatenate([fit_x, val_x]), np.concatenate([fit_y, val_y]), test_x, test_y,
                          c=search.best_c, num_classes=num_classes, metric=metric)
    return ProbeResult(metric=metric, value=float(value), c=search.best_c, val_score=search.best_score,
                       fits=len(search.evaluated) + 1, train_samples=len(fit_x), val_samples=len(val_x),
                       test_samples=len(test_x))
