"""Decontamination: find training pairs whose image is (nearly) an evaluation image.

In the spirit of the CLIP paper's data-overlap analysis (section 5): every image of every evaluation dataset on
disk is pHashed; training images within the near-duplicate threshold of any of them are removed, and a report per
dataset says how many training pairs matched, out of how many evaluation images, with examples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clip.dedup.neardup import find_cross_pairs
from clip.formats.errors import MissingInputError
from clip.formats.images import IMAGE_SUFFIXES
from clip.formats.raw import COLOR_LENGTH, color_signature
from clip.imagehash import phash64
from clip.synthetic import EVAL_SET_NAMES, generate_eval_set

log = logging.getLogger(__name__)

SYNTHETIC_EVAL_SEED = 0
SYNTHETIC_EVAL_SIZE = 1000


@dataclass
class EvalSet:
    """One evaluation dataset's image hashes. Row `r` of `hashes` belongs to image `image_of[r]`, whose id
    (relative path or index) is `ids[image_of[r]]`: an image can have several rows (its mirror, small crops).

    `color_check`: whether a pHash match must also pass the colour check. Real evaluation images favour recall
    (a grayscale, sepia or tinted copy is still the test image): no check. The synthetic sets keep it: their
    held-out colour x shape combinations share layouts with training scenes in other colours by design."""

    name: str
    ids: list[str]
    hashes: np.ndarray  # [rows] uint64
    source: str  # folder path or "synthetic"
    signatures: np.ndarray = field(default_factory=lambda: np.empty((0, COLOR_LENGTH), np.float32))  # [rows, 192]
    unreadable: list[str] = field(default_factory=list)
    image_of: np.ndarray | None = None  # [rows] int64; None: one row per image
    color_check: bool = True

    def __post_init__(self) -> None:
        if self.image_of is None:
            self.image_of = np.arange(self.hashes.size, dtype=np.int64)

    @property
    def num_images(self) -> int:
        return len(self.ids)


# Crops of the evaluation side that pHash alone would miss on the training side: 2% and 4% in total from the
# centre, and 2% from one edge at a time, each of the image and of its mirror (14 hashes per image).
CENTRE_CROPS = (0.02, 0.04)
EDGE_CROP = 0.02


def hash_variants(image: Image.Image) -> list[Image.Image]:
    """The image, its mirror, and small crops of both: what a training copy of an evaluation image often is."""
    variants = []
    for base in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        w, h = base.size
        variants.append(base)
        for fraction in CENTRE_CROPS:
            dx, dy = round(w * fraction / 2), round(h * fraction / 2)
            variants.append(base.crop((dx, dy, w - dx, h - dy)))
        dx, dy = max(1, round(w * EDGE_CROP)), max(1, round(h * EDGE_CROP))
        variants += [base.crop((dx, 0, w, h)), base.crop((0, 0, w - dx, h)),
                     base.crop((0, dy, w, h)), base.crop((0, 0, w, h - dy))]
    return variants


def hash_image_folder(folder: str | Path, name: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> EvalSet:
    """pHash of every image under `folder` (recursively); ids are paths relative to the folder, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise MissingInputError(f"evaluation folder {folder} does not exist (dedup.eval_dirs)")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def images():  # (id, RGB image or None when unreadable)
        for path in paths:
            try:
                with Image.open(path) as image:
                    yield path.relative_to(root).as_posix(), image.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                log.warning("evaluation image %s is unreadable, skipped: %s", path, exc)
                yield path.relative_to(root).as_posix(), None

    return _hash_eval_images(name or root.name, str(root), images(), len(paths), progress)


def _hash_eval_images(name: str, source: str, images: Iterable[tuple[str, Image.Image | None]], total: int,
                      progress: Callable[[int, int], None] | None) -> EvalSet:
    """An evaluation set's rows: every variant (hash_variants) of every readable image; None images are listed
    as unreadable. Real evaluation images favour recall: no colour check."""
    ids: list[str] = []
    hashes: list[int] = []
    image_of: list[int] = []
    unreadable: list[str] = []
    for done, (image_id, image) in enumerate(images, start=1):
        if image is None:
            unreadable.append(image_id)
        else:
            variant_hashes = [phash64(variant) for variant in hash_variants(image)]
            hashes += variant_hashes
            image_of += [len(ids)] * len(variant_hashes)
            ids.append(image_id)
        if progress is not None:
            progress(done, total)
    return EvalSet(name=name, ids=ids, hashes=np.array(hashes, dtype=np.uint64), source=source,
                   unreadable=unreadable, image_of=np.array(image_of, dtype=np.int64), color_check=False)


def hash_registry_dataset(key: str, root: str | Path,
                          progress: Callable[[int, int], None] | None = None) -> EvalSet | None:
    """Hashes of every split of registry dataset `key` under `root`, read through the evaluation loaders
    (clip.evalsets: the images the evaluation stage will score); None when its folder is absent. Ids are
    `<split>/<sample id>`; undecodable images are listed as unreadable."""
    from clip.evalsets import get_dataset

    entry = get_dataset(key)
    if not entry.available(root):
        log.info("evaluation dataset %s: no data at %s, nothing to decontaminate against", key, entry.path(root))
        return None
    splits = [entry.load(root, split) for split in entry.splits]
    images = ((f"{split.split}/{split.ids[i]}", split.image(i))  # image(i): None when undecodable (logged)
              for split in splits for i in range(len(split)))
    return _hash_eval_images(key, str(entry.path(root)), images, sum(len(split) for split in splits), progress)


def registry_keys(names: list[str]) -> list[str]:
    """The registry datasets among evaluation names (the synthetic sets and other kinds are handled elsewhere)."""
    from clip.evalsets import list_datasets, list_shift_datasets

    known = set(list_datasets()) | set(list_shift_datasets())  # the distribution shift sets are scored too
    return [name for name in names if name in known]


def _stack(signatures: list[np.ndarray]) -> np.ndarray:
    return np.stack(signatures) if signatures else np.empty((0, COLOR_LENGTH), np.float32)


def synthetic_eval_sets(image_size: int, seed: int = SYNTHETIC_EVAL_SEED,
                        num_images: int = SYNTHETIC_EVAL_SIZE) -> list[EvalSet]:
    """Hashes of the built-in synthetic evaluation sets (clip.synthetic), rendered as evaluation renders them."""
    sets = []
    for set_name in EVAL_SET_NAMES:
        pairs = generate_eval_set(set_name, seed=seed, n=num_images, image_size=image_size)
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


def _text(key: str | bytes) -> str:
    return key.decode("utf-8") if isinstance(key, bytes) else key


ConfirmFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train idx [k], eval signatures [k, 192]) -> keep [k]


def find_overlap(train_hashes: np.ndarray, train_keys: Sequence[str] | np.ndarray, eval_sets: list[EvalSet],
                 threshold: int, max_examples: int, confirm: ConfirmFn | None = None) -> OverlapResult:
    """Training indices within `threshold` of any evaluation image, and the per-dataset overlap report.

    `train_keys`: the training keys (str, or UTF-8 bytes as the pool's key column holds them).

    `confirm`: optional second check of each pHash match (the colour signature), applied to the sets whose
    `color_check` is on; rejected matches do not count. Matches are reported per evaluation image (a match to
    any of an image's variant hashes is a match to the image).
    """
    removed: dict[int, tuple[str, int]] = {}
    report: dict[str, dict[str, Any]] = {}
    for eval_set in eval_sets:
        train_idx, eval_idx, distance = find_cross_pairs(train_hashes, eval_set.hashes, threshold)
        phash_matches = int(train_idx.size)
        if confirm is not None and eval_set.color_check and train_idx.size:
            keep = confirm(train_idx, eval_set.signatures[eval_idx])
            train_idx, eval_idx, distance = train_idx[keep], eval_idx[keep], distance[keep]
        assert eval_set.image_of is not None
        eval_idx = eval_set.image_of[eval_idx]  # hash row -> evaluation image
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
        rows = sorted(zip(distance[first].tolist(), [_text(train_keys[t]) for t in matched_train.tolist()],
                          eval_idx[first].tolist(), strict=True))
        examples = [
            {"train_key": key, "eval_id": eval_set.ids[e],
             "eval_path": (str(Path(eval_set.source) / eval_set.ids[e]) if eval_set.source != "synthetic" else None),
             "distance": int(d)}
            for d, key, e in rows[:max_examples]
        ]
        report[eval_set.name] = {
            "matched": int(matched_train.size),  # training pairs within the threshold of this dataset
            "eval_images": eval_set.num_images,
            "eval_images_matched": int(np.unique(eval_idx).size),
            "overlap_fraction": float(np.unique(eval_idx).size / eval_set.num_images) if eval_set.num_images else 0.0,
            "color_check": eval_set.color_check,
            "threshold": threshold,
            "phash_matches": phash_matches,  # (train, eval) pairs within the threshold before the colour check
            "color_rejected": phash_matches - int(train_idx.size),
            "source": eval_set.source,
            "unreadable": len(eval_set.unreadable),
            "examples": examples,
        }
    return OverlapResult(removed=removed, report=report)
