"""Publishing a data version: shards first, verified, then `sizes.json`, then `manifest.json` last.

A reader that finds `manifest.json` can trust every shard it names to be complete and to have the listed size
and SHA-256. The order that guarantees it:
1. if a manifest for a *different* data version is there, delete it first: its shards are about to change;
2. put every shard in place (local: rename of a fully written temp file; S3: parallel idempotent uploads through
   `clip.storage`, which skips an object already there with the same checksum, so a re-run after a failure sends
   only what is missing);
3. verify every shard where it now lies: listed size and stored SHA-256 against what was written;
4. write `sizes.json`, then `manifest.json`; only then remove shards of older versions that it does not name.
Any failure before step 4 leaves no manifest, so no half-published version is ever visible.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from clip import storage
from clip.config import StorageConfig
from clip.formats.manifest import (
    MANIFEST_NAME,
    SIZES_NAME,
    Manifest,
    ShardEntry,
    find_manifest,
    is_shard_name,
)
from clip.shards.writer import ShardFile

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Publishing did not complete; no manifest was written for this data version."""


def build_manifest(shards: list[ShardFile]) -> Manifest:
    return Manifest.build([ShardEntry(s.name, s.samples, s.bytes, s.sha256) for s in shards])


@dataclass
class PublishResult:
    manifest: Manifest
    uploaded: int  # shards sent (S3) or moved into place (local)
    skipped: int  # shards already there, identical
    removed_stale: int


def _place_local(shard: ShardFile, uri: str) -> bool:
    """Local output: the shard was written beside its final name; an atomic rename puts it in place."""
    final = os.fspath(uri)
    if os.path.abspath(shard.path) == os.path.abspath(final):
        return False
    os.replace(shard.path, final)
    return True


def publish(shards: list[ShardFile], output_uri: str, storage_cfg: StorageConfig | None = None,
            upload_workers: int = 8, progress: Callable[[int, int], None] | None = None) -> PublishResult:
    """Put `shards` (finished local tars) at `output_uri`, verify them, then write sizes.json and the manifest."""
    remote = storage.is_s3_uri(output_uri)
    manifest = build_manifest(shards)
    manifest_uri = storage.join(output_uri, MANIFEST_NAME)
    store = storage.get_storage(manifest_uri, storage_cfg)
    if not remote:
        os.makedirs(output_uri, exist_ok=True)

    previous = find_manifest(output_uri, storage_cfg)
    if previous is not None and previous.data_version != manifest.data_version:
        log.info("replacing data version %s by %s", previous.data_version, manifest.data_version)
        store.delete(manifest_uri)

    # Step 2: shards into place; every failure is collected so the shards that did go up stay up.
    uploaded = skipped = 0
    failures: list[tuple[str, BaseException]] = []

    def put(shard: ShardFile) -> bool:
        uri = storage.join(output_uri, shard.name)
        return store.upload_file(shard.path, uri) if remote else _place_local(shard, uri)

    with ThreadPoolExecutor(max_workers=max(1, upload_workers if remote else 1),
                            thread_name_prefix="shard-upload") as pool:
        futures = {pool.submit(put, shard): shard for shard in shards}
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                if future.result():
                    uploaded += 1
                else:
                    skipped += 1
            except Exception as exc:  # noqa: BLE001 - reported together below
                failures.append((futures[future].name, exc))
            if progress is not None:
                progress(done, len(shards))
    if failures:
        failures.sort(key=lambda f: f[0])
        names = ", ".join(name for name, _ in failures[:5]) + (" ..." if len(failures) > 5 else "")
        raise PublishError(f"{len(failures)} of {len(shards)} shard(s) failed to publish to {output_uri} "
                           f"({names}); first error: {failures[0][1]}. No manifest was written; run again "
                           f"to send only what is missing.") from failures[0][1]

    # Step 3: verify where they now lie.
    listed = {info.uri: info.size for info in store.list(output_uri)}
    for shard in shards:
        uri = storage.join(output_uri, shard.name)
        if listed.get(uri) != shard.bytes:
            raise PublishError(f"{uri}: listed size {listed.get(uri)} != written {shard.bytes}; no manifest written")
        stored = store.sha256(uri)
        if stored is not None and stored != shard.sha256:
            raise PublishError(f"{uri}: stored sha256 {stored} != written {shard.sha256}; no manifest written")
        if stored is None:
            log.warning("%s has no stored sha256; verified by size only", uri)

    # Step 4: sizes.json, then the manifest, last.
    store.write_bytes(storage.join(output_uri, SIZES_NAME), manifest.sizes_bytes())
    store.write_bytes(manifest_uri, manifest.to_bytes())

    named = {storage.join(output_uri, s.name) for s in shards}
    removed = 0
    for uri in listed:
        name = uri.rsplit("/", 1)[-1] if remote else os.path.basename(uri)
        in_folder = storage.join(output_uri, name) == uri  # directly under the output, not in a sub-folder
        if in_folder and is_shard_name(name) and uri not in named:
            store.delete(uri)
            removed += 1
    return PublishResult(manifest=manifest, uploaded=uploaded, skipped=skipped, removed_stale=removed)
