"""The built-in synthetic evaluation sets, as EvalSets: always available, so a report is never empty.

    evalset = synthetic_set("synthetic-shapes", split="test", n=300, image_size=64)

They come from clip.synthetic's generator (`EVAL_SET_NAMES`: shapes, colours, and held-out colour x shape
combinations that training never shows), on seed streams training never uses. Splits differ by seed: `test`
uses `seed`, `train` uses `seed + 1` (for the linear probe; its validation part is a deterministic split of train).
Images are rendered at the model's input size. The metric is top-1 accuracy; the templates follow the
pool's own caption styles, so the prompt ensemble sees the phrasings training saw.
"""

from __future__ import annotations

from pathlib import Path

from clip.evalsets.base import EvalSet
from clip.synthetic import EVAL_SET_NAMES, EVAL_TEMPLATES, eval_classnames, generate_eval_set

SYNTHETIC_ALIAS = "synthetic"  # in evaluate.datasets: all of EVAL_SET_NAMES
SYNTHETIC_TEMPLATES = list(EVAL_TEMPLATES)
SPLITS = ("train", "test")


def is_synthetic(key: str) -> bool:
    return key in EVAL_SET_NAMES


def expand_names(keys: list[str]) -> list[str]:
    """`synthetic` -> every built-in set; order kept, duplicates dropped."""
    out: list[str] = []
    for key in keys:
        for name in (EVAL_SET_NAMES if key == SYNTHETIC_ALIAS else [key]):
            if name not in out:
                out.append(name)
    return out


def synthetic_set(name: str, split: str = "test", *, n: int = 300, image_size: int = 64, seed: int = 0,
                  heldout_fraction: float | None = None) -> EvalSet:
    """`n` samples of one built-in set, classes in turn; `split` is train or test (different seeds)."""
    if split not in SPLITS:
        raise ValueError(f"{name}: split {split!r} is not one of {', '.join(SPLITS)}")
    kwargs = {} if heldout_fraction is None else {"heldout_fraction": heldout_fraction}
    classes = eval_classnames(name, **kwargs)
    samples = generate_eval_set(name, seed=seed + (1 if split == "train" else 0), n=n, image_size=image_size,
                                **kwargs)
    index = {label: i for i, label in enumerate(classes)}
    images = [image for image, _ in samples]
    return EvalSet(key=name, split=split, root=Path("<built-in>"), classes=list(classes),
                   ids=[f"{name}/{split}/seed{seed}/{image_size}px/heldout{heldout_fraction}/{i}" for i in range(len(samples))],
                   labels=[index[label] for _, label in samples], load_image=lambda i: images[i],
                   templates=list(SYNTHETIC_TEMPLATES))
