"""The `folder` source: a folder tree of images, each with a sidecar caption file of the same stem."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from clip.collect.sources.base import Candidate, CandidateSource, Partition, SourceError
from clip.config import FolderSourceConfig
from clip.formats.images import IMAGE_SUFFIXES


class FolderSource(CandidateSource):
    """Images in a folder tree, each with a sidecar caption file of the same stem."""

    name = "folder"

    def __init__(self, cfg: FolderSourceConfig, partition_size: int) -> None:
        self.cfg = cfg
        self.root = Path(cfg.path or "")
        if not self.root.is_dir():
            raise SourceError(f"collect.folder.path: {self.root} is not a folder")
        self.partition_size = partition_size
        # Sorted relative paths: the order, and so the keys, do not depend on the file system.
        self.images = sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )

    def partitions(self) -> list[Partition]:
        return [
            Partition(i, ("folder", tuple(self.images[start:start + self.partition_size])))
            for i, start in enumerate(range(0, len(self.images), self.partition_size))
        ]

    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        for rel in part.spec[1]:
            yield self._candidate(rel, with_images)

    def _candidate(self, rel: str, with_images: bool) -> Candidate:
        image_path = self.root / rel
        sidecar = image_path.with_suffix(self.cfg.caption_extension)
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
        return Candidate(rel, caption, str(image_path), image_path.read_bytes() if with_images else None)

    def load_images(self, part: Partition, rows: Sequence[int]) -> dict[int, Candidate]:
        names = part.spec[1]
        return {row: self._candidate(names[row], True) for row in rows}
