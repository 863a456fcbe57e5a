"""Decontamination: find training pairs whose image is (nearly) an evaluation image.

In the spirit of the CLIP paper's data-overlap analysis (section 5): every image of every evaluation dataset on
disk is pHashed; training images within the near-duplicate threshold of any of them are removed, and a report per
dataset says how many training pairs matched, out of how many evaluation images, with examples.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clip.dedup.color import SIGNATURE_LENGTH, color_signature
from clip.dedup.neardup import find_cross_pairs
from clip.formats.errors import MissingInputError
from clip.imagehash import phash64

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SYNTHETIC_EVAL_SEED = 0
SYNTHETIC_EVAL_SIZE = 1000


@dataclass
class EvalSet:
    """One evaluation dataset's image hashes: `ids[i]` (relative path or index) has hash `hashes[i]`."""

    name: str
    ids: list[str]
    hashes: np.ndarray  # [n] uint64
    source: str  # folder path or "synthetic"
    signatures: np.ndarray = field(default_factory=lambda: np.empty((0, SIGNATURE_LENGTH), np.float32))  # [n, 192]
    unreadable: list[str] = field(default_factory=list)


def hash_image_folder(folder: str | Path, name: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> EvalSet:
    """pHash of every image under `folder` (recursively); ids are paths relative to the folder, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise MissingInputError(f"evaluation folder {folder} does not exist (dedup.eval_dirs)")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    ids: list[str] = []
    hashes: list[int] = []
    signatures: list[np.ndarray] = []
    unreadable: list[str] = []
    for done, path in enumerate(paths, start=1):
        rel = path.relative_to(root).as_posix()
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            hashes.append(phash64(rgb))
            signatures.append(color_signature(rgb))
            ids.append(rel)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            unreadable.append(rel)
            log.warning("evaluation image %s is unreadable, skipped: %s", path, exc)
        if progress is not None:
            progress(done, len(paths))
    return EvalSet(name=name or root.name, ids=ids, hashes=np.array(hashes, dtype=np.uint64), source=str(root),
                   signatures=_stack(signatures), unreadable=unreadable)


def _stack(signatures: list[np.ndarray]) -> np.ndarray:
    return np.stack(signatures) if signatures else np.empty((0, SIGNATURE_LENGTH), np.float32)


def synthetic_eval_sets(image_size: int, seed: int = SYNTHETIC_EVAL_SEED,
                        num_images: int = SYNTHETIC_EVAL_SIZE) -> list[EvalSet]:
    """Hashes of the built-in synthetic evaluation sets; [] with a warning when the generator is not available."""
    try:
        from clip.synthetic import EVAL_SET_NAMES, generate_eval_set
    except ImportError as exc:
        log.warning("synthetic evaluation sets unavailable (clip.synthetic: %s); not decontaminated", exc)
        return []
    # Use the generator's own defaults for seed / size when it has them, so we hash what evaluation will use.
    params = inspect.signature(generate_eval_set).parameters
    kwargs: dict[str, Any] = {}
    for arg, value in (("seed", seed), ("n", num_images), ("image_size", image_size)):
        if arg in params and params[arg].default is inspect.Parameter.empty:
            kwargs[arg] = value
    sets = []
    for set_name in EVAL_SET_NAMES:
        pairs = generate_eval_set(set_name, **kwargs)
        hashes = np.array([phash64(image) for image, _label in pairs], dtype=np.uint64)
        sets.append(EvalSet(name=f"synthetic/{set_name}", ids=[str(i) for i in range(len(pairs))],
                            hashes=hashes, source="synthetic",
                            signatures=_stack([color_signature(image) for image, _label in pairs])))
    return sets


def eval_set_names(folders: list[str]) -> list[str]:
    """A distinct dataset name per folder: its base name, suffixed with its position when two collide."""
    bases = [Path(f).resolve().name or str(f) for f in folders]
    return [b if bases.count(b) == 1 else f"{b}-{i}" for i, b in enumerate(bases)]


@dataclass
class OverlapResult:
    removed: dict[int, tuple[str, int]]  # train index -> ("dataset:eval_id", distance) of its closest match
    report: dict[str, dict[str, Any]]


ConfirmFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train idx [k], eval signatures [k, 192]) -> keep [k]


def find_overlap(train_hashes: np.ndarray, train_keys: list[str], eval_sets: list[EvalSet], threshold: int,
                 max_examples: int, confirm: ConfirmFn | None = None) -> OverlapResult:
    """Training indices within `threshold` of any evaluation image, and the per-dataset overlap report.

    `confirm`: optional second check of each pHash match (the colour signature); rejected matches do not count.
    """
    removed: dict[int, tuple[str, int]] = {}
    report: dict[str, dict[str, Any]] = {}
    for eval_set in eval_sets:
        train_idx, eval_idx, distance = find_cross_pairs(train_hashes, eval_set.hashes, threshold)
        phash_matches = int(train_idx.size)
        if confirm is not None and train_idx.size:
            keep = confirm(train_idx, eval_set.signatures[eval_idx])
            train_idx, eval_idx, distance = train_idx[keep], eval_idx[keep], distance[keep]
        # Closest evaluation match per training image: sort by (train, distance, eval) and keep the first row.
        order = np.lexsort((eval_idx, distance, train_idx))
        train_idx, eval_idx, distance = train_idx[order], eval_idx[order], distance[order]
        first = np.concatenate(([True], train_idx[1:] != train_idx[:-1])) if train_idx.size else train_idx.astype(bool)
        matched_train = train_idx[first]
        for t, e, d in zip(matched_train.tolist(), eval_idx[first].tolist(), distance[first].tolist(), strict=True):
            candidate = (f"{eval_set.name}:{eval_set.ids[e]}", int(d))
            if t not in removed or candidate[1] < removed[t][1]:
                removed[t] = candidate
        # Examples: the closest matches first, then by training key, so the report is deterministic.
        rows = sorted(zip(distance[first].tolist(), [train_keys[t] for t in matched_train.tolist()],
                          eval_idx[first].tolist(), strict=True))
        examples = [
            {"train_key": key, "eval_id": eval_set.ids[e],
             "eval_path": (str(Path(eval_set.source) / eval_set.ids[e]) if eval_set.source != "synthetic" else None),
             "distance": int(d)}
            for d, key, e in rows[:max_examples]
        ]
        report[eval_set.name] = {
            "matched": int(matched_train.size),  # training pairs within the threshold of this dataset
            "eval_images": int(eval_set.hashes.size),
            "eval_images_matched": int(np.unique(eval_idx).size),
            "overlap_fraction": float(np.unique(eval_idx).size / eval_set.hashes.size) if eval_set.hashes.size else 0.0,
            "threshold": threshold,
            "phash_matches": phash_matches,  # (train, eval) pairs within the threshold before the colour check
            "color_rejected": phash_matches - int(train_idx.size),
            "source": eval_set.source,
            "unreadable": len(eval_set.unreadable),
            "examples": examples,
        }
    return OverlapResult(removed=removed, report=report)
