"""What every evaluation loader returns, and the checks they share.

A `DatasetEntry` (one per dataset in the registry, registry.py) knows a dataset's classes, templates, splits and
folder, and loads one split with its loader.

An `EvalSet` is a list of samples of one split of one dataset. Iterating it yields `(image, label)`: `image` a PIL
image in RGB, `label` a class index into `EvalSet.classes` (a tuple of indices for the multi-label VOC 2007). It has
a length (samples listed, before any is decoded) and counts what it had to skip: a sample whose image does not
decode is reported once through `logging` and skipped, `skipped` counts them and `skipped_ids` names them, so one
bad file never kills an evaluation of thousands.

Labels are mapped by name, never by list position: `ClassMap` turns the dataset's own class name (a folder, a
code, a name in its metadata) into the registry's index, through the registry's explicit `class_ids` where the
dataset calls a class something else, and through a normalised spelling otherwise (lower case, letters and digits
only, so `aquarium_fish`, `Aquarium Fish` and `aquarium fish` agree). A name that matches no class is a
`FormatError` naming the file it came from. Datasets that only store integer labels (MNIST, GTSRB, Flowers102,
FER2013, PCam, Hateful Memes) are the exception: their published class lists are in label order, so
`ClassMap.by_label` maps the integer itself.

Splits a release does not define (EuroSAT, RESISC45, KITTI, Caltech-101) are cut by `stable_split`: a sample's
split is decided by the SHA-1 of its relative path, so it never changes when files are added or the disk is
listed in another order.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from clip.formats.errors import FormatError, MissingInputError

log = logging.getLogger(__name__)

Label = int | tuple[int, ...]
# What a bad image raises while PIL decodes it: unknown format, truncated data, broken headers.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def normalise_name(name: str) -> str:
    """'Aquarium_fish', "Allen's Hummingbird" -> 'aquariumfish', 'allenshummingbird': spelling-proof name key."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def require(path: Path, what: str) -> Path:
    """`path` must exist inside a dataset root that does: FormatError naming the expected file otherwise."""
    if not path.exists():
        raise FormatError(f"{what}: expected {path} (the dataset folder exists but this file is missing)")
    return path


def check_counts(images: int, labels: int, images_file: Path | str, labels_file: Path | str) -> None:
    """Images and labels read from a release must pair up one to one: a mismatch (a half-written or mixed-up
    file) would otherwise score the shorter list silently. FormatError naming both files and both counts."""
    if images != labels:
        where = f"{labels_file}" if str(labels_file) == str(images_file) else f"{labels_file} and {images_file}"
        raise FormatError(f"{where}: {labels} labels for {images} images (a truncated or mismatched file)")


def require_root(root: Path, key: str) -> Path:
    if not root.is_dir():
        raise MissingInputError(f"{key}: no data at {root}")
    return root


def stable_split(relative_id: str, test_fraction: float, val_fraction: float = 0.0) -> str:
    """'train', 'val' or 'test' for one sample, from the SHA-1 of its id (deterministic, order-free)."""
    bucket = int.from_bytes(hashlib.sha1(relative_id.encode()).digest()[:4], "big") / 2**32
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def open_rgb(source: Path | bytes | Image.Image) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later in a transform) and convert to RGB."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes):
        import io

        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    image.load()
    return image.convert("RGB")


class ClassMap:
    """The dataset's own class names -> registry indices, by name (see the module docstring)."""

    def __init__(self, classes: Sequence[str], class_ids: Sequence[str] | None = None):
        self.classes = list(classes)
        keys = class_ids if class_ids else classes
        self._index: dict[str, int] = {}
        for i, key in enumerate(keys):
            self._index.setdefault(key, i)
            self._index.setdefault(normalise_name(key), i)

    def __call__(self, source_name: str, source_file: Path | str) -> int:
        index = self._index.get(source_name, self._index.get(normalise_name(source_name)))
        if index is None:
            raise FormatError(f"{source_file}: class {source_name!r} is not one of the dataset's classes")
        return index

    def by_label(self, label: int, source_file: Path | str) -> int:
        return check_label(label, len(self.classes), source_file)


def check_label(label: int, num_classes: int, source_file: Path | str) -> int:
    """An integer label must index a class: a negative one would wrap to the last class in Python indexing."""
    if not 0 <= int(label) < num_classes:
        raise FormatError(f"{source_file}: label {label} outside 0..{num_classes - 1}")
    return int(label)


@dataclass
class EvalSet:
    """One split of one dataset: `len()` samples, iterated as `(RGB PIL image, label)`, bad images skipped."""

    key: str
    split: str
    root: Path
    classes: list[str]
    ids: list[str]  # one per sample: a path, or `file#index` for samples packed in one file
    labels: list[Label]
    load_image: Callable[[int], Any]  # sample index -> path, bytes or PIL image (decoded by `open_rgb`)
    templates: list[str] = field(default_factory=list)
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[Image.Image, Label]]:
        self.skipped, self.skipped_ids = 0, []
        for i in range(len(self.labels)):
            image = self.image(i)
            if image is not None:
                yield image, self.labels[i]

    def image(self, i: int) -> Image.Image | None:
        """Sample `i` decoded, or None (counted and logged) when its image is corrupt or unreadable."""
        try:
            return open_rgb(self.load_image(i))
        except DECODE_ERRORS as exc:
            self.skipped += 1
            self.skipped_ids.append(self.ids[i])
            log.warning("%s/%s: skipped unreadable image %s (%s)", self.key, self.split, self.ids[i], exc)
            return None


def image_list(key: str, split: str, root: Path, classes: list[str], items: list[tuple[Path, Label]],
               templates: list[str] | None = None) -> EvalSet:
    """An EvalSet over image files on disk."""
    paths = [path for path, _ in items]
    return EvalSet(key=key, split=split, root=root, classes=classes, ids=[str(p) for p in paths],
                   labels=[label for _, label in items], load_image=lambda i: paths[i],
                   templates=list(templates or []))


def check_split(key: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ValueError(f"{key}: split {split!r} is not one of {', '.join(splits)}")


# A dataset's loader: (its entry, the dataset folder under --root, the split) -> the split's samples.
Loader = Callable[["DatasetEntry", Path, str], EvalSet]


@dataclass(frozen=True)
class DatasetEntry:
    """One evaluation dataset of the registry (registry.py): what it is, where it lies, and how it is read."""

    key: str
    name: str
    metric: str
    splits: tuple[str, ...]
    subdir: str  # the dataset's folder under --root
    layout: str  # what is expected inside it, for people
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    class_ids: tuple[str, ...] | None
    num_classes: int
    source: str
    loader: Loader = field(repr=False, compare=False)  # reads one split (release.py, torchvision_sets.py, ...)
    class_synonyms: dict | None = None

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.subdir

    def available(self, root: str | Path) -> bool:
        return self.path(root).is_dir()

    def load(self, root: str | Path, split: str = "test") -> EvalSet:
        """Read one split from `root/<subdir>`: MissingInputError when absent, FormatError when malformed."""
        check_split(self.key, split, self.splits)
        base = require_root(self.path(root), self.key)
        dataset = self.loader(self, base, split)
        if not dataset.templates:
            dataset.templates = list(self.templates)
        return dataset
