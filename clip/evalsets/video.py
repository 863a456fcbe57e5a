"""UCF101 and Kinetics700, read as the CLIP paper read them: one image per video, its middle frame.

torchvision's video datasets decode whole clips into tensors; the paper embeds only the middle frame, so we decode
with PyAV and keep frame `n // 2` of the `n` frames of the first video stream. The frame is found by decoding in
order, not by seeking: a seek lands on a key frame, and which one depends on the encoder, so the "middle" would
move with the file's GOP size. A video that does not decode counts as a corrupt image (skipped, counted).

- UCF101: `UCF-101/<Class>/<video>.avi` with the official split 1 (`ucfTrainTestlist/trainlist01.txt`,
  `testlist01.txt`); the class is the folder part of each listed path, matched to the paper's spaced names
  (`ApplyEyeMakeup` -> "Apply Eye Makeup") by normalised spelling.
- Kinetics700: `<split>/<label>/<youtube id>_<start>_<end>.mp4`, the layout of the common Kinetics downloaders;
  test = `val`, since the test labels were never released. The published prompt list has 588 of the 700 classes:
  labels found on disk and missing from it are appended after the published ones (sorted, prompted by their own
  name), so label indices are the same for train and test.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from clip.evalsets.base import ClassMap, DatasetEntry, EvalSet, image_list, normalise_name, require
from clip.formats.errors import FormatError

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}


def middle_frame(path: Path) -> Image.Image:
    """Frame n // 2 of the first video stream, as an RGB image; OSError when the file does not decode."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise OSError(f"{path}: no video stream")
            stream = container.streams.video[0]
            total = stream.frames
            if total <= 0:  # the container does not say: count by decoding
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            target = total // 2
            for index, frame in enumerate(container.decode(stream)):
                if index == target:
                    return frame.to_image().convert("RGB")
    except av.FFmpegError as exc:
        raise OSError(f"{path}: {exc}") from exc
    raise OSError(f"{path}: no decodable frame")


def ucf101(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    videos = require(base / "UCF-101", entry.key)
    list_file = require(base / "ucfTrainTestlist" / ("trainlist01.txt" if split == "train" else "testlist01.txt"),
                        entry.key)
    cmap = ClassMap(entry.classes, entry.class_ids)
    items = []
    for line in list_file.read_text().splitlines():
        if not line.strip():
            continue
        relative = line.split()[0]
        if "/" not in relative:
            raise FormatError(f"{list_file}: expected <Class>/<video> entries, found {relative!r}")
        items.append((videos / relative, cmap(relative.split("/")[0], list_file)))
    dataset = image_list(entry.key, split, base, list(entry.classes), items)
    dataset.load_image = lambda i: middle_frame(Path(dataset.ids[i]))
    return dataset


def kinetics700(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    folder = require(base / ("train" if split == "train" else "val"), entry.key)
    labels_on_disk = sorted({d.name for name in ("train", "val") if (base / name).is_dir()
                             for d in (base / name).iterdir() if d.is_dir()})
    published = {normalise_name(c) for c in entry.classes}
    classes = list(entry.classes) + [label for label in labels_on_disk if normalise_name(label) not in published]
    cmap = ClassMap(classes)
    items = []
    for label_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        label = cmap(label_dir.name, label_dir)
        items += [(p, label) for p in sorted(label_dir.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES]
    if not items:
        raise FormatError(f"{entry.key}: expected <label>/<video>.mp4 folders in {folder}")
    dataset = image_list(entry.key, split, base, classes, items)
    dataset.load_image = lambda i: middle_frame(Path(dataset.ids[i]))
    return dataset
