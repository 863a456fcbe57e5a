"""The CLIP paper's natural distribution shift sets on ImageNet's classes (Radford et al. 2021, section 3.3 and
Figure 13), each read from its release layout under the common `--root DIR` (evaluate.data_root):

- ImageNetV2 matched-frequency (Recht et al. 2019, github.com/modestyachts/ImageNetV2):
  `imagenetv2-matched-frequency-format-val/<class index 0..999>/<hash>.jpeg`; all 1000 classes.
- ImageNet-Sketch (Wang et al. 2019, github.com/HaohanWang/ImageNet-Sketch): `sketch/<wnid>/<name>.JPEG`; all
  1000 classes.
- ImageNet-R (Hendrycks et al. 2021, "The Many Faces of Robustness", github.com/hendrycks/imagenet-r):
  `imagenet-r/<wnid>/<name>.jpg`, 200 classes.
- ImageNet-A (Hendrycks et al. 2021, "Natural Adversarial Examples", github.com/hendrycks/natural-adv-examples):
  `imagenet-a/<wnid>/<name>.jpg` plus `README.txt`, 200 classes.
- ObjectNet 1.0 (Barbu et al. 2019, objectnet.dev): `objectnet-1.0/images/<ObjectNet folder>/<file>.png` and
  `objectnet-1.0/mappings/`; the 113 ObjectNet classes that overlap ImageNet's.

Every set is zero-shot classified with ImageNet's 1000 class names and 80 templates (the registry's `imagenet`
entry, whose WordNet ids give the wnid -> ImageNet index map), restricted, where the set covers only some of
ImageNet's classes, to those classes, as the paper did. A `ShiftSet`'s `classes` are that subset (in ImageNet
order), `imagenet_indices` their ImageNet indices and its labels index into the subset.

Where the class subsets come from (nothing is downloaded and no list is shipped for them):
- ImageNet-R and ImageNet-A: the 200 wnids are the release's folder names, read from the user's copy (that is the
  release layout; this project could not reproduce the published 200-wnid lists exactly from memory, and an
  invented list would silently score another task). Every folder must be one of ImageNet's 1000 wnids. A copy
  with fewer than the release's 200 folders (an interrupted extraction) is still scored, over the classes found,
  and says so: `partial` on the set, a warning in the log, a note in the results row.
- ObjectNet: its licence does not allow shipping its class mapping, so it is read from the copy's `mappings/`:
  `folder_to_objectnet_label.json` (image folder -> ObjectNet label), `objectnet_to_imagenet_1k.json` (ObjectNet
  label -> ImageNet class names separated by ';'; its keys are the 113 overlapping classes),
  `imagenet_to_label_2012_v2` (one ImageNet class name per line: line i names ImageNet-2012 id i) and
  `pytorch_to_imagenet_2012_id.json` (PyTorch class index, the registry's order -> ImageNet-2012 id; 0- or
  1-based ids are recognised by their range, as the file must map the 1000 indices one to one). An image's label
  is the tuple of subset positions of every ImageNet class its ObjectNet class maps to; a prediction is right
  when it is one of them. Images of the ~200 ObjectNet classes without an ImageNet counterpart are left out.
  ObjectNet images carry a 1-pixel red border, which the loader crops (the ObjectNet README asks for it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clip.evalsets.base import DatasetEntry, EvalSet, Label, require
from clip.evalsets.release import _images_in
from clip.formats.errors import FormatError

log = logging.getLogger(__name__)

# key, display name, folder under --root, expected layout, class folders of the release (ObjectNet: the classes
# that overlap ImageNet's), source
SHIFT_TABLE: list[tuple[str, str, str, str, int, str]] = [
    ("imagenetv2", "ImageNetV2 (matched frequency)", "imagenetv2-matched-frequency-format-val",
     "<ImageNet class index 0..999>/<hash>.jpeg", 1000,
     "Recht et al. 2019, github.com/modestyachts/ImageNetV2 (matched-frequency); all 1000 ImageNet classes"),
    ("imagenet_sketch", "ImageNet-Sketch", "sketch", "<wnid>/<name>.JPEG (1000 wnids)", 1000,
     "Wang et al. 2019, github.com/HaohanWang/ImageNet-Sketch; all 1000 ImageNet classes"),
    ("imagenet_r", "ImageNet-R", "imagenet-r", "<wnid>/<name>.jpg (200 wnids)", 200,
     "Hendrycks et al. 2021, github.com/hendrycks/imagenet-r; its 200 classes read from the copy's folder names"),
    ("imagenet_a", "ImageNet-A", "imagenet-a", "<wnid>/<name>.jpg (200 wnids), README.txt", 200,
     "Hendrycks et al. 2021, github.com/hendrycks/natural-adv-examples; its 200 classes read from the copy's "
     "folder names"),
    ("objectnet", "ObjectNet (113 ImageNet classes)", "objectnet-1.0",
     "images/<ObjectNet folder>/<file>.png, mappings/{folder_to_objectnet_label.json, objectnet_to_imagenet_1k.json, "
     "pytorch_to_imagenet_2012_id.json, imagenet_to_label_2012_v2}", 113,
     "Barbu et al. 2019, objectnet.dev; class mapping read from the copy's mappings/ (its licence does not allow "
     "shipping it)"),
]
SHIFT_KEYS = tuple(row[0] for row in SHIFT_TABLE)
RELEASE_CLASSES = {row[0]: row[4] for row in SHIFT_TABLE}
IMAGENET_CLASSES = 1000


@dataclass
class ShiftSet(EvalSet):
    """An EvalSet over a subset of ImageNet's classes: `classes[i]` is ImageNet class `imagenet_indices[i]`."""

    imagenet_indices: list[int] = field(default_factory=list)
    partial: str = ""  # why the copy looks incomplete ("3 of the release's 200 class folders"), else ""


def _class_folders(base: Path) -> list[Path]:
    folders = sorted(d for d in base.iterdir() if d.is_dir())
    if not folders:
        raise FormatError(f"{base}: expected class folders (the release layout), found none")
    return folders


def _shift_set(entry: DatasetEntry, base: Path, split: str, paths: list[Path], labels: list[Label],
               subset: list[int], found: int, what: str = "class folders", crop_border: bool = False) -> ShiftSet:
    """A ShiftSet zero-shot over the ImageNet classes `subset`; `labels` index into it. `found` class folders of
    the release's count were there: fewer is reported (a warning, and `partial` for the results row)."""
    release = RELEASE_CLASSES[entry.key]
    partial = f"{found} of the release's {release} {what}" if found < release else ""
    if partial:
        log.warning("%s: %s in %s: scored over what is there (an incomplete copy?)", entry.key, partial, base)
    load = (lambda i: _without_border(paths[i])) if crop_border else (lambda i: paths[i])
    return ShiftSet(key=entry.key, split=split, root=base, classes=[entry.classes[i] for i in subset],
                    ids=[str(p) for p in paths], labels=labels, load_image=load, imagenet_indices=list(subset),
                    partial=partial)


def _positioned(entry: DatasetEntry, base: Path, split: str, items: list[tuple[Path, int]], subset: list[int],
                found: int) -> ShiftSet:
    """`items` (image, ImageNet index) as a ShiftSet over `subset`."""
    position = {index: i for i, index in enumerate(subset)}
    return _shift_set(entry, base, split, [path for path, _ in items], [position[i] for _, i in items], subset,
                      found)


def _wnid_index(entry: DatasetEntry) -> dict[str, int]:
    if not entry.class_ids:
        raise FormatError(f"{entry.key}: the registry's ImageNet entry has no WordNet ids (clip/evalsets/data)")
    return {wnid: i for i, wnid in enumerate(entry.class_ids)}


def _by_wnid(entry: DatasetEntry, base: Path, split: str, whole_imagenet: bool) -> ShiftSet:
    """`<wnid>/<image>` folders; zero-shot over all 1000 classes, or over the wnids found (`whole_imagenet` False)."""
    index = _wnid_index(entry)
    folders = _class_folders(base)
    items = []
    for folder in folders:
        if folder.name not in index:
            raise FormatError(f"{folder}: folder {folder.name!r} is not one of ImageNet's 1000 WordNet ids "
                              f"(the release names each class folder by its wnid)")
        items += [(path, index[folder.name]) for path in _images_in(folder)]
    subset = list(range(IMAGENET_CLASSES)) if whole_imagenet else sorted(index[f.name] for f in folders)
    return _positioned(entry, base, split, items, subset, len(folders))


def imagenetv2(entry: DatasetEntry, base: Path, split: str) -> ShiftSet:
    folders = _class_folders(base)
    items = []
    for folder in folders:
        if not (folder.name.isdigit() and 0 <= int(folder.name) < IMAGENET_CLASSES):
            raise FormatError(f"{folder}: ImageNetV2's class folders are ImageNet class indices 0..999, "
                              f"found {folder.name!r}")
        items += [(path, int(folder.name)) for path in _images_in(folder)]
    return _positioned(entry, base, split, items, list(range(IMAGENET_CLASSES)), len(folders))


def imagenet_sketch(entry: DatasetEntry, base: Path, split: str) -> ShiftSet:
    return _by_wnid(entry, base, split, whole_imagenet=True)


def imagenet_r(entry: DatasetEntry, base: Path, split: str) -> ShiftSet:
    return _by_wnid(entry, base, split, whole_imagenet=False)


def imagenet_a(entry: DatasetEntry, base: Path, split: str) -> ShiftSet:
    return _by_wnid(entry, base, split, whole_imagenet=False)


# -- ObjectNet ---------------------------------------------------------------------------------------------------


def _json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(require(path, what).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: expected a JSON object, found a {type(doc).__name__}")
    return doc


def _pytorch_to_2012(path: Path) -> dict[int, int]:
    """PyTorch index -> 0-based ImageNet-2012 id (line of imagenet_to_label_2012_v2), one to one."""
    try:
        mapping = {int(k): int(v) for k, v in _json(path, "objectnet").items()}
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{path}: expected {{class index: ImageNet-2012 id}} integers ({exc})") from None
    if set(mapping) != set(range(IMAGENET_CLASSES)):
        raise FormatError(f"{path}: expected the {IMAGENET_CLASSES} class indices 0..999 as keys, "
                          f"found {len(mapping)}")
    ids = set(mapping.values())
    for first in (0, 1):  # the ids may be counted from 0 or from 1: the file is a permutation of one range
        if ids == set(range(first, first + IMAGENET_CLASSES)):
            return {k: v - first for k, v in mapping.items()}
    raise FormatError(f"{path}: the ImageNet-2012 ids are not a one-to-one map onto 0..999 (or 1..1000)")


def objectnet_mapping(mappings: Path) -> dict[str, list[int]]:
    """ObjectNet label -> the ImageNet (PyTorch) indices it maps to, for its classes that overlap ImageNet's,
    from the release's `mappings/` folder (see the module docstring)."""
    to_imagenet_file = mappings / "objectnet_to_imagenet_1k.json"
    labels_file = require(mappings / "imagenet_to_label_2012_v2", "objectnet")
    to_names = _json(to_imagenet_file, "objectnet")
    names = [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != IMAGENET_CLASSES:
        raise FormatError(f"{labels_file}: expected {IMAGENET_CLASSES} ImageNet class names, one per line, "
                          f"found {len(names)}")
    line_of = {name: line for line, name in enumerate(names)}
    pytorch_of_line = {line: index for index, line in _pytorch_to_2012(mappings / "pytorch_to_imagenet_2012_id.json"
                                                                       ).items()}
    mapping = {}
    for label, joined in to_names.items():
        indices = []
        for name in (n.strip() for n in str(joined).split(";")):
            if name not in line_of:
                raise FormatError(f"{to_imagenet_file}: ObjectNet class {label!r} maps to {name!r}, which is not "
                                  f"a line of {labels_file.name}")
            indices.append(pytorch_of_line[line_of[name]])
        mapping[label] = sorted(set(indices))
    if not mapping:
        raise FormatError(f"{to_imagenet_file}: maps no ObjectNet class to ImageNet")
    return mapping


def _without_border(path: Path) -> Image.Image:
    """ObjectNet's images carry a 1-pixel red border: crop one pixel from every side."""
    image = Image.open(path)
    image.load()
    width, height = image.size
    return image.crop((1, 1, width - 1, height - 1)) if width > 2 and height > 2 else image


def objectnet(entry: DatasetEntry, base: Path, split: str) -> ShiftSet:
    mappings = require(base / "mappings", entry.key)
    images = require(base / "images", entry.key)
    folder_file = mappings / "folder_to_objectnet_label.json"
    folder_label = _json(folder_file, entry.key)
    to_imagenet = objectnet_mapping(mappings)
    # The task is defined by the mapping (all its overlapping classes), not by which folders this copy holds.
    subset = sorted({index for indices in to_imagenet.values() for index in indices})
    position = {index: i for i, index in enumerate(subset)}
    paths: list[Path] = []
    labels: list[Label] = []
    overlapping = 0
    for folder in _class_folders(images):
        if folder.name not in folder_label:
            raise FormatError(f"{folder}: folder {folder.name!r} is not listed in {folder_file}")
        indices = to_imagenet.get(str(folder_label[folder.name]))
        if indices is None:  # an ObjectNet class without an ImageNet counterpart: not part of the evaluation
            continue
        overlapping += 1
        label = tuple(position[index] for index in indices)
        for path in _images_in(folder):
            paths.append(path)
            labels.append(label)
    return _shift_set(entry, base, split, paths, labels, subset, overlapping, "overlapping class folders",
                      crop_border=True)


LOADERS = {"imagenetv2": imagenetv2, "imagenet_sketch": imagenet_sketch, "imagenet_r": imagenet_r,
           "imagenet_a": imagenet_a, "objectnet": objectnet}
