"""CLIP_benchmark's webdataset layout, in which many teams already keep these evaluation sets.

    <root>/classnames.txt                          one class name per line; line i is label i
    <root>/zeroshot_classification_templates.txt   one template per line, `{c}` for the class name
    <root>/<split>/nshards.txt                     the number of shards, n
    <root>/<split>/0.tar ... <n-1>.tar             samples: `<key>.webp|jpg|png` + `<key>.cls` (the label)

(classnames.txt and the templates are also accepted inside `<split>/`.) The tars are indexed from their headers
(clip.formats.tar.index_tar_members) and each image is read with one seek when it is needed, so a 50,000-image set
is not held in memory. In this layout the label is defined as a line number of classnames.txt, so that file's
order is the class order; templates are converted to the registry's `{}` form.
"""

from __future__ import annotations

from pathlib import Path

from clip.evalsets.base import EvalSet, require, require_root
from clip.formats.errors import FormatError
from clip.formats.images import WEBDATASET_IMAGE_KEYS
from clip.formats.tar import index_tar_members, split_member_name


def _text_lines(root: Path, split: str, name: str) -> list[str]:
    for folder in (root, root / split):
        if (folder / name).exists():
            return [line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    require(root / name, "webdataset")
    return []


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def load_webdataset(root: str | Path, split: str = "test", key: str | None = None) -> EvalSet:
    """One split of a CLIP_benchmark webdataset folder as an EvalSet (see the module docstring)."""
    root = require_root(Path(root), key or "webdataset")
    classes = _text_lines(root, split, "classnames.txt")
    templates_file = [t.replace("{c}", "{}") for t in _text_lines(root, split, "zeroshot_classification_templates.txt")]
    count_file = require(root / split / "nshards.txt", key or "webdataset")
    try:
        nshards = int(count_file.read_text().strip())
    except ValueError as exc:
        raise FormatError(f"{count_file}: expected the number of shards ({exc})") from exc
    ids, labels, locations = [], [], []
    for shard in range(nshards):
        tar_path = require(root / split / f"{shard}.tar", key or "webdataset")
        samples: dict[str, dict[str, object]] = {}
        for location, read in index_tar_members(tar_path):
            sample_key, ext = split_member_name(location.name)
            fields = samples.setdefault(sample_key, {})
            if ext == "cls":
                fields["cls"] = read()
            elif ext in WEBDATASET_IMAGE_KEYS:
                fields["image"] = (location.offset, location.size)
        for sample_key, fields in samples.items():
            if "cls" not in fields or "image" not in fields:
                raise FormatError(f"{tar_path}: sample {sample_key!r} lacks a .cls label or a .webp/.jpg/.png image")
            text = fields["cls"].decode(errors="replace").strip()  # type: ignore[union-attr]
            label = int(text) if text.lstrip("-").isdigit() else -1
            if not 0 <= label < len(classes):
                raise FormatError(f"{tar_path}: sample {sample_key!r} has label {text!r}, classnames.txt has "
                                  f"{len(classes)} classes")
            ids.append(f"{tar_path}#{sample_key}")
            labels.append(label)
            locations.append((tar_path, *fields["image"]))  # type: ignore[misc]
    return EvalSet(key=key or root.name, split=split, root=root, classes=classes, ids=ids, labels=labels,
                   load_image=lambda i: _read_at(*locations[i]), templates=templates_file)
