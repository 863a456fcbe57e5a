"""Raw shard output: webdataset tars written under a temporary name and renamed when complete, plus the small
per-shard done-records that make the collection stage restartable.

Layout under `collect.output_dir` (a local folder or s3://bucket/prefix):

    raw-00000.tar               {key}.jpg, {key}.txt, {key}.json per sample (docs/formats.md "Raw shards")
    records/raw-00000.json      the shard's done-record: fingerprint + every candidate's status

A shard counts as done only when both its tar and its record exist and the record's fingerprint matches the
plan (the same candidates, keys and image settings). The tar is published first and the record second, so an
interruption between the two leaves a shard that is simply built again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from clip import storage
from clip.config import StorageConfig
from clip.formats.raw import RECORDS_DIR, RawSample, raw_shard_index, raw_shard_name, write_raw_shard
from clip.storage.local import TMP_MARK

_PARTIAL_SUFFIX = ".partial"  # local temp name: .raw-00003.tar.partial (fixed: a rerun overwrites it)


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

    def temp_path(self, name: str) -> str:
        """A local file to write `name` into before `publish`: beside the final file locally, else in /tmp."""
        if not self.is_s3:
            return str(Path(self.uri, f".{name}{_PARTIAL_SUFFIX}"))
        folder = tempfile.mkdtemp(prefix="raw-output-")
        return str(Path(folder, name))

    def publish(self, local_tmp: str, name: str) -> None:
        """Move a finished temp_path file to its final name (rename locally, one atomic upload to S3)."""
        if not self.is_s3:
            os.replace(local_tmp, Path(self.uri, name))
            return
        try:
            storage.upload_file(local_tmp, self.path(name), self.storage_cfg)
        finally:
            Path(local_tmp).unlink(missing_ok=True)
            Path(local_tmp).parent.rmdir()

    def remove_partials(self) -> list[str]:
        """Delete half-written shards left by an interrupted run (local output; S3 never shows partial objects)."""
        if self.is_s3:
            return []
        removed = []
        # Ours (candidates.parquet's temp_path) and clip.storage's temporary names (`.<name>.tmp-<hex>`).
        for pattern in (f".*{_PARTIAL_SUFFIX}", f".*{TMP_MARK}*"):
            for partial in Path(self.uri).glob(pattern):
                partial.unlink(missing_ok=True)
                removed.append(partial.name)
        return sorted(removed)

    def existing_shard_indices(self) -> set[int]:
        """Indices of raw-NNNNN.tar and records/raw-NNNNN.json present in the output."""
        found: set[int] = set()
        for info in storage.list_objects(self.uri, self.storage_cfg):
            index = raw_shard_index(storage.basename(info.uri))
            if index is not None:
                found.add(index)
        return found
