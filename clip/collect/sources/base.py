"""What every candidate source implements (`CandidateSource`), what it yields (`Candidate`) from what parts
(`Partition`), its error (`SourceError`), and the path / object helpers the file-based sources share."""

from __future__ import annotations

import glob
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clip.config import StorageConfig


class SourceError(ValueError):
    """A source that cannot be read as configured (missing file or column, unknown format); names the culprit."""


@dataclass
class Candidate:
    source_key: str  # stable identity inside the source: "file:row", a relative path, "tar#key", an index
    caption: str
    url: str | None  # table: the image URL to fetch; local sources: where the image is (for the record)
    image: bytes | Image.Image | None = None  # local sources, when asked for: encoded bytes or rendered pixels


@dataclass(frozen=True)
class Partition:
    index: int
    spec: tuple[Any, ...]  # source-specific; picklable


class CandidateSource(ABC):
    """The interface every source implements."""

    name: str = "?"
    needs_fetch: bool = False  # True: images come from URLs (the fetcher); False: the source holds them

    @abstractmethod
    def partitions(self) -> list[Partition]:
        """The pool split into independently readable parts, in a fixed order."""

    @abstractmethod
    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        """Candidates of one partition, in a fixed order (their position is their row number in the partition)."""

    def load_images(self, part: Partition, rows: Sequence[int]) -> dict[int, Candidate]:
        """The candidates at `rows` of a partition, with their images (local sources)."""
        wanted = set(rows)
        found: dict[int, Candidate] = {}
        for row, cand in enumerate(self.iter_candidates(part, with_images=True)):
            if row in wanted:
                found[row] = cand
                if len(found) == len(wanted):
                    break
        return found

    def vocabulary(self) -> list[str]:
        """Queries the source knows to be meaningful (the synthetic world's words and phrases).

        When a source has one and no corpus is given, it replaces mining the captions (`from_captions`):
        template words of generated captions are not worth searching for.
        """
        return []


def expand_local_or_s3(pattern: str, storage_cfg: StorageConfig | None) -> list[str]:
    """A path, glob or brace pattern -> the sorted files it names (s3:// globs are listed under their prefix)."""
    import fnmatch

    from braceexpand import braceexpand

    out: list[str] = []
    for item in braceexpand(pattern):
        if item.startswith("s3://"):
            if any(ch in item for ch in "*?["):
                from clip import storage

                prefix = item[: min(item.index(ch) for ch in "*?[" if ch in item)]
                prefix = prefix.rsplit("/", 1)[0]
                out.extend(o.uri for o in storage.list_objects(prefix, storage_cfg) if fnmatch.fnmatch(o.uri, item))
            else:
                out.append(item)
        elif any(ch in item for ch in "*?["):
            out.extend(sorted(glob.glob(item, recursive=True)))
        else:
            out.append(item)
    return out


def expand_all(patterns: Sequence[str], key: str, noun: str, storage_cfg: StorageConfig | None) -> list[str]:
    """Every file the patterns of config `key` name, in order; a pattern that names none is a SourceError
    ("<key>: <pattern> matches no <noun>")."""
    files: list[str] = []
    for pattern in patterns:
        found = expand_local_or_s3(pattern, storage_cfg)
        if not found:
            raise SourceError(f"{key}: {pattern} matches no {noun}")
        files.extend(found)
    return files


def open_binary(uri: str, storage_cfg: StorageConfig | None):
    if uri.startswith("s3://"):
        from clip import storage

        return storage.open_read(uri, storage_cfg)
    if not os.path.exists(uri):
        raise SourceError(f"input file {uri} does not exist")
    return open(uri, "rb")
