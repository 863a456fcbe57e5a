"""Shard indexes: where each sample of a published training shard lies, and the SHA-256 of its bytes.

One index per shard, beside it in the version folder (`shard-00000.tar` -> `index-00000.json`, named in the
shard's manifest entry with the index's own SHA-256, so the data version covers it; docs/formats.md "Training
shards"). Written by the publisher from the bytes as they are written (`DeterministicTarWriter.spans`), never
rewritten. The document:

    {
      "format": "clip-pipeline/shard-index/v1",
      "shard": "shard-00000.tar", "bytes": 1290240, "sha256": "<the shard's sha256>",
      "samples": [["000000042", 0, 3584, "<sha256 of bytes [0, 3584)>"], ...]
    }

Guarantees a reader can rely on once `parse_shard_index` returned (it checks them): the samples are in tar order,
their byte ranges `[start, end)` tile the whole shard (the first starts at 0, each starts where the previous one
ends, the last ends at `bytes`, so the end-of-archive blocks and record padding belong to the last sample), and
each range holds the complete tar members of exactly that sample. Reading samples `[i, j)` is therefore one
contiguous read of bytes `[samples[i].start, samples[j - 1].end)`, and checking each range's SHA-256 verifies
every byte read against the published version without reading the rest of the shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from clip.formats.errors import FormatError
from clip.formats.jsondoc import parse_format_doc

INDEX_FORMAT = "clip-pipeline/shard-index/v1"
INDEX_PREFIX = "index-"
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".tar"


def index_name(shard: str) -> str:
    """The index of `shard-00000.tar` is `index-00000.json` (any other name: `<name>.index.json`)."""
    if shard.startswith(_SHARD_PREFIX) and shard.endswith(_SHARD_SUFFIX):
        return f"{INDEX_PREFIX}{shard[len(_SHARD_PREFIX):-len(_SHARD_SUFFIX)]}.json"
    return f"{shard}.index.json"


@dataclass(frozen=True)
class SampleSpan:
    """One sample's bytes in its shard: `[start, end)`, and their SHA-256 (hex)."""

    key: str
    start: int
    end: int
    sha256: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardIndex:
    shard: str  # the shard's name, as in the manifest
    bytes: int  # the shard's size
    sha256: str  # the shard's SHA-256
    samples: tuple[SampleSpan, ...]

    def to_bytes(self) -> bytes:
        """The index document: one sample per line, so the same shard always gives the same bytes."""
        head = {"format": INDEX_FORMAT, "shard": self.shard, "bytes": self.bytes, "sha256": self.sha256}
        rows = ",\n".join(json.dumps([s.key, s.start, s.end, s.sha256]) for s in self.samples)
        text = json.dumps(head)[:-1] + ', "samples": [\n' + rows + "\n]}\n"
        return text.encode("utf-8")

    def sha256_of_bytes(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def parse_shard_index(raw: bytes, uri: str) -> ShardIndex:
    """Parse and check an index's bytes (see the module doc); FormatError naming `uri` and what is wrong."""
    doc: dict[str, Any] = parse_format_doc(raw, uri, INDEX_FORMAT, "shard index")
    try:
        samples = tuple(SampleSpan(str(k), int(a), int(b), str(h)) for k, a, b, h in doc["samples"])
        index = ShardIndex(shard=str(doc["shard"]), bytes=int(doc["bytes"]), sha256=str(doc["sha256"]),
                           samples=samples)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{uri}: not a valid shard index ({exc!r})") from None
    previous_end = 0
    for span in samples:
        if span.start != previous_end or span.end <= span.start:
            raise FormatError(f"{uri}: sample {span.key} spans bytes [{span.start}, {span.end}), expected to start "
                              f"at {previous_end} (ranges must tile the shard)")
        previous_end = span.end
    if samples and previous_end != index.bytes:
        raise FormatError(f"{uri}: the samples end at byte {previous_end}, the shard has {index.bytes} bytes")
    return index
