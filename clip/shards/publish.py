"""Publishing a data version: its own folder `<output>/<data_version>/`, never rewritten, then the pointer.

A reader that resolved `latest.json` to a version folder can trust every byte in it for as long as it reads:
nothing here ever deletes or overwrites an object of another version, and a version folder is complete before
the pointer names it. The order:
1. the shards of the new version and their indexes (`index-00000.json` beside `shard-00000.tar`: each sample's
   byte range and SHA-256, clip/formats/shard_index.py), each verified where it lies (listed size and stored
   SHA-256 against what was written), then `sizes.json`, then `manifest.json` last in the version folder;
   - local output: the tars are written into a hidden staging folder inside the output (`.publishing`), the
     sizes and manifest beside them, and the folder is renamed to `<data_version>` in one step;
   - S3 output: the data version is a hash of the shards' hashes, so it is learnt first by a hashing pass
     that writes nothing (`hash_shard`); then each shard is written to a local temp file, uploaded and deleted
     (`clip.storage.write_stream` spooling into `shard.staging_dir`), at most `upload_workers` at once, so
     local disk stays bounded whatever the data size; its index (built while the shard is streamed, checked
     against the hashing pass) follows it in one PUT. Uploads are idempotent: an object already there with the
     same size and stored SHA-256 (a previous, interrupted attempt) is not sent again;
2. the pointer `latest.json` is moved to the version (one atomic write) unless it already names it.
Publishing a version that is already there (same data version, manifest present) re-verifies its shards and
writes nothing; a failure before the manifest leaves no manifest and the pointer where it was. One publisher per
output at a time: the shard stage holds `<output>/.lock` (clip.storage.lock) around the whole run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError
from clip.formats.manifest import (
    MANIFEST_NAME,
    SIZES_NAME,
    Manifest,
    ShardEntry,
    parse_manifest,
    read_pointer,
    version_location,
    write_pointer,
)
from clip.formats.tar import DeterministicTarWriter
from clip.shards.writer import (
    RawIndex,
    ShardFile,
    ShardPlan,
    shard_index_bytes,
    shard_index_of,
    stream_shard,
    write_shards,
)

log = logging.getLogger(__name__)

LOCAL_STAGING_NAME = ".publishing"  # hidden folder inside a local output; renamed to the version when complete

Tick = Callable[[int, int], None] | None


class PublishError(RuntimeError):
    """Publishing did not complete; no manifest was written for this data version, the pointer did not move."""


def build_manifest(shards: list[ShardFile], published_at: str = "") -> Manifest:
    manifest = Manifest.build([ShardEntry(s.name, s.samples, s.bytes, s.sha256, index=s.index,
                                          index_sha256=s.index_sha256) for s in shards])
    return replace(manifest, published_at=published_at)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # microseconds: orders quick publishes


@dataclass
class PublishResult:
    manifest: Manifest
    location: str  # the version folder
    uploaded: int  # shards sent (S3) or placed (local) by this run
    skipped: int  # shards already there, identical
    already_published: bool  # the version was complete before this run (only re-verified)
    pointer_moved: bool
    peak_local_shards: int  # S3: most shard files on local disk at once


def existing_manifest(location: str, storage_cfg: StorageConfig | None) -> Manifest | None:
    """The manifest of a version folder, None when absent; PublishError when present but unreadable."""
    uri = storage.join(location, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        return None
    try:
        return parse_manifest(raw, uri)
    except FormatError as exc:
        raise PublishError(f"{exc}; remove that version folder by hand and publish again") from None


def verify_version(manifest: Manifest, location: str, storage_cfg: StorageConfig | None) -> None:
    """Every shard of `manifest` lies in `location` with its listed size and stored SHA-256, and so does every
    shard index it names (SHA-256 stored, or computed from its bytes when none is stored)."""
    store = storage.get_storage(location, storage_cfg)
    listed = {info.uri: info.size for info in store.list(location)}
    for shard in manifest.shards:
        if shard.index:
            uri = storage.join(location, shard.index)
            if uri not in listed:
                raise PublishError(f"{uri}: the index of {shard.name} is missing; no manifest written, pointer "
                                   "not moved")
            stored = store.sha256(uri) or hashlib.sha256(store.read_bytes(uri)).hexdigest()
            if stored != shard.index_sha256:
                raise PublishError(f"{uri}: sha256 {stored} != manifest {shard.index_sha256}; no manifest written, "
                                   "pointer not moved")
        uri = storage.join(location, shard.name)
        if listed.get(uri) != shard.bytes:
            raise PublishError(f"{uri}: listed size {listed.get(uri)} != manifest {shard.bytes}; no manifest "
                               "written, pointer not moved")
        stored = store.sha256(uri)
        if stored is not None and stored != shard.sha256:
            raise PublishError(f"{uri}: stored sha256 {stored} != manifest {shard.sha256}; no manifest written, "
                               "pointer not moved")
        if stored is None:
            log.warning("%s has no stored sha256; verified by size only", uri)


def _move_pointer(output: str, manifest: Manifest, storage_cfg: StorageConfig | None) -> bool:
    current = read_pointer(output, storage_cfg)
    if current is not None and current.data_version == manifest.data_version:
        return False
    write_pointer(output, manifest.data_version, manifest.published_at or utc_now(), storage_cfg)
    return True


def _write_index_files(manifest: Manifest, location: str, storage_cfg: StorageConfig | None) -> None:
    storage.write_bytes(storage.join(location, SIZES_NAME), manifest.sizes_bytes(), storage_cfg)
    storage.write_bytes(storage.join(location, MANIFEST_NAME), manifest.to_bytes(), storage_cfg)


def publish_local(plans: list[ShardPlan], index: RawIndex, output: str, workers: int = 2,
                  storage_cfg: StorageConfig | None = None, write_progress: Tick = None,
                  publish_progress: Tick = None) -> PublishResult:
    """Local output: write into `<output>/.publishing/`, then rename it to `<output>/<data_version>/`."""
    staging = storage.join(output, LOCAL_STAGING_NAME)
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted earlier attempt
    try:
        shards = write_shards(plans, index, lambda name: storage.to_local_path(storage.join(staging, name)),
                              workers=workers, progress=write_progress)
        manifest = build_manifest(shards, utc_now())
        location = version_location(output, manifest.data_version)
        existing = existing_manifest(location, storage_cfg)
        if existing is not None:
            verify_version(existing, location, storage_cfg)  # re-verify; write nothing
            uploaded, skipped, manifest = 0, len(shards), existing
        else:
            if os.path.exists(location):
                raise PublishError(f"{location} exists but holds no {MANIFEST_NAME}: not a published version; "
                                   "remove it by hand and publish again")
            _write_index_files(manifest, staging, storage_cfg)
            verify_version(manifest, staging, storage_cfg)
            os.rename(staging, location)  # the whole version appears at once
            uploaded, skipped = len(shards), 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if publish_progress is not None:
        publish_progress(len(plans), len(plans))
    moved = _move_pointer(output, manifest, storage_cfg)
    return PublishResult(manifest=manifest, location=location, uploaded=uploaded, skipped=skipped,
                         already_published=existing is not None, pointer_moved=moved, peak_local_shards=0)


def publish_remote(plans: list[ShardPlan], index: RawIndex, output: str, staging_dir: str, workers: int = 2,
                   upload_workers: int = 8, storage_cfg: StorageConfig | None = None, hash_progress: Tick = None,
                   publish_progress: Tick = None) -> PublishResult:
    """S3 output: hash every shard (no disk), then write-upload-delete each one into `<output>/<version>/`."""
    hashed = write_shards(plans, index, None, workers=workers, progress=hash_progress)
    manifest = build_manifest(hashed, utc_now())
    location = version_location(output, manifest.data_version)
    existing = existing_manifest(location, storage_cfg)
    if existing is not None:
        verify_version(existing, location, storage_cfg)
        if publish_progress is not None:
            publish_progress(len(plans), len(plans))
        moved = _move_pointer(output, existing, storage_cfg)
        return PublishResult(manifest=existing, location=location, uploaded=0, skipped=len(plans),
                             already_published=True, pointer_moved=moved, peak_local_shards=0)

    store = storage.get_storage(location, storage_cfg)
    listed = {info.uri: info.size for info in store.list(location)}
    expected = {shard.name: shard for shard in hashed}
    os.makedirs(staging_dir, exist_ok=True)
    lock = threading.Lock()
    on_disk = [0, 0]  # [now, peak] shard files being spooled

    def put(plan: ShardPlan) -> bool:
        """Send the shard, then its index; False when an earlier, interrupted attempt sent both."""
        uri = storage.join(location, plan.name)
        want = expected[plan.name]
        index_uri = storage.join(location, want.index)
        index_there = index_uri in listed and store.sha256(index_uri) == want.index_sha256
        if listed.get(uri) == want.bytes and store.sha256(uri) == want.sha256:
            if index_there:
                return False
            index_bytes = shard_index_bytes(plan, index)  # the shard is there: rebuild its index only (no disk)
        else:
            with lock:
                on_disk[0] += 1
                on_disk[1] = max(on_disk[1], on_disk[0])
            writers: list[DeterministicTarWriter] = []
            try:
                storage.write_stream(uri, lambda handle: writers.append(stream_shard(plan, index, handle)),
                                     storage_cfg, spool_dir=staging_dir)
            finally:
                with lock:
                    on_disk[0] -= 1
            index_bytes = shard_index_of(plan, writers[-1]).to_bytes()
        if hashlib.sha256(index_bytes).hexdigest() != want.index_sha256:  # deterministic: the hashing pass agrees
            raise PublishError(f"{index_uri}: rebuilt index differs from the hashing pass's")
        if not index_there:
            storage.write_bytes(index_uri, index_bytes, storage_cfg)
        return True

    uploaded = skipped = 0
    failures: list[tuple[str, BaseException]] = []
    with ThreadPoolExecutor(max_workers=max(1, upload_workers), thread_name_prefix="shard-upload") as pool:
        futures = {pool.submit(put, plan): plan for plan in plans}
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                if future.result():
                    uploaded += 1
                else:
                    skipped += 1
            except Exception as exc:  # noqa: BLE001 - reported together below
                failures.append((futures[future].name, exc))
            if publish_progress is not None:
                publish_progress(done, len(plans))
    if failures:
        failures.sort(key=lambda f: f[0])
        names = ", ".join(name for name, _ in failures[:5]) + (" ..." if len(failures) > 5 else "")
        raise PublishError(f"{len(failures)} of {len(plans)} shard(s) failed to publish to {location} "
                           f"({names}); first error: {failures[0][1]}. No manifest was written and the pointer "
                           f"did not move; run again to send only what is missing.") from failures[0][1]
    verify_version(manifest, location, storage_cfg)
    _write_index_files(manifest, location, storage_cfg)
    moved = _move_pointer(output, manifest, storage_cfg)
    return PublishResult(manifest=manifest, location=location, uploaded=uploaded, skipped=skipped,
                         already_published=False, pointer_moved=moved, peak_local_shards=on_disk[1])
