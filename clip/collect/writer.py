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

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip import storage
from clip.config import StorageConfig

RECORDS_DIR = "records"
_PARTIAL_SUFFIX = ".partial"  # local temp name: .raw-00003.tar.partial (fixed: a rerun overwrites it)


def shard_name(index: int) -> str:
    return f"raw-{index:05d}.tar"


def record_name(index: int) -> str:
    return f"raw-{index:05d}.json"


@dataclass
class RawSample:
    key: str
    jpeg: bytes
    caption: str
    meta: dict[str, Any]  # the {key}.json fields


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata: the same samples give a byte-identical tar
    tar.addfile(info, io.BytesIO(data))


def _fill_tar(handle: Any, samples: list[RawSample]) -> None:
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            _add_member(tar, f"{sample.key}.jpg", sample.jpeg)
            _add_member(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
            _add_member(tar, f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode("utf-8"))


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
        name = shard_name(index)
        if not self.is_s3:
            final = Path(self.uri, name)
            partial = final.with_name(f".{name}{_PARTIAL_SUFFIX}")
            with open(partial, "wb") as handle:
                _fill_tar(handle, samples)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, final)
            return final.stat().st_size
        # S3: a local temporary tar, uploaded in one (possibly multipart) request that is atomic on S3.
        with tempfile.TemporaryDirectory(prefix="raw-shard-") as staging:
            local = Path(staging, name)
            with open(local, "wb") as handle:
                _fill_tar(handle, samples)
            storage.upload_file(local, self.path(name), self.storage_cfg)
            return local.stat().st_size

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
        for partial in Path(self.uri).glob(f".*{_PARTIAL_SUFFIX}"):
            partial.unlink(missing_ok=True)
            removed.append(partial.name)
        return removed

    def existing_shard_indices(self) -> set[int]:
        """Indices of raw-NNNNN.tar and records/raw-NNNNN.json present in the output."""
        found: set[int] = set()
        for info in storage.list_objects(self.uri, self.storage_cfg):
            base = info.uri.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("raw-") and base.endswith((".tar", ".json")):
                digits = base[4:].split(".", 1)[0]
                if digits.isdigit():
                    found.add(int(digits))
        return found
