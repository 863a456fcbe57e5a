"""Raw shard output: webdataset tars written through `clip.storage` (visible under their names only once complete),
plus the small per-shard done-records that make the collection stage restartable.

Layout under `collect.output_dir` (a local folder or s3://bucket/prefix):

    raw-00000.tar               {key}.jpg, {key}.txt, {key}.json per sample (docs/formats.md "Raw shards")
    records/raw-00000.json      the shard's done-record: fingerprint + every candidate's status

A shard counts as done only when both its tar and its record exist and the record's fingerprint matches the
plan (the same candidates, keys and image settings). The tar is published first and the record second, so an
interruption between the two leaves a shard that is simply built again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clip import storage
from clip.config import StorageConfig
from clip.formats.raw import RECORDS_DIR, RawSample, raw_shard_index, raw_shard_name, write_raw_shard


class RawOutput:
    """The output folder of the collection stage: local or S3, through clip.storage."""

    def __init__(self, uri: str, storage_cfg: StorageConfig | None = None) -> None:
        self.uri = uri
        self.storage_cfg = storage_cfg
        self.is_s3 = storage.is_s3_uri(uri)
        if not self.is_s3:
            Path(uri, RECORDS_DIR).mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def exists(self, *parts: str) -> bool:
        return storage.exists(self.path(*parts), self.storage_cfg)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        storage.write_bytes(self.path(*parts), data, self.storage_cfg)

    def read_json(self, *parts: str) -> Any:
        return json.loads(storage.read_bytes(self.path(*parts), self.storage_cfg))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"), *parts)

    def delete(self, *parts: str) -> None:
        storage.delete(self.path(*parts), self.storage_cfg)

    def write_shard(self, index: int, samples: list[RawSample]) -> int:
        """Write raw-NNNNN.tar: to a temporary name first, visible under its final name only when complete.

        Returns the tar's size in bytes.
        """
        # storage.write_stream: a temp file beside the final name then a rename (local), or a spooled upload in
        # one request (S3); either way the shard is visible only when complete.
        return storage.write_stream(self.path(raw_shard_name(index)), lambda handle: write_raw_shard(handle, samples),
                                    self.storage_cfg)

    def remove_partials(self) -> list[str]:
        """Delete what interrupted writes left in the output folder (clip.storage's temporary files; S3 never shows
        partial objects); returns their names. Called before this run writes anything."""
        return storage.remove_leftovers(self.uri)

    def existing_shard_indices(self) -> set[int]:
        """Indices of raw-NNNNN.tar and records/raw-NNNNN.json present in the output."""
        found: set[int] = set()
        for info in storage.list_objects(self.uri, self.storage_cfg):
            index = raw_shard_index(storage.basename(info.uri))
            if index is not None:
                found.add(index)
        return found
