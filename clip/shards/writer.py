"""Shuffled training shards from the raw pool, streamed: no image is held in memory beyond the one being copied.

1. `index_raw_members`: one pass over the headers of the raw shards holding kept keys records, per kept key,
   where each of its members' bytes lie (raw shard, offset, size). Tar headers are read; of the data only the
   kept samples' small `{key}.json` members are, to check each image sha256 against keep.parquet's (a keep-list
   from another raw pool is refused: keys are positional, so a collect rerun reuses them for other images).
2. `plan_shards`: the kept keys in a deterministic shuffled order (seeded permutation of the sorted keys, so
   samples from all sources and raw shards mix), cut into shards at `samples_per_shard` samples or
   `max_shard_bytes` bytes, whichever comes first (exact sizes are known from the index).
3. `stream_shard`: copies each sample's members by offset into a byte-deterministic tar on any binary stream,
   recording each sample's byte range and SHA-256 on the way (the shard's index, clip/formats/shard_index.py);
   `write_shard` puts the tar in a local file and its index beside it (each through `clip.storage`: visible
   under its name only once complete), `hash_shard` only hashes both (no disk), which is how the S3 publisher learns the data version before
   anything is uploaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from clip import storage
from clip.formats.dedup import KEEP_NAME
from clip.formats.errors import MissingInputError, StaleInputError
from clip.formats.manifest import shard_name
from clip.formats.raw import SAMPLE_MEMBERS, sample_json_digests
from clip.formats.shard_index import ShardIndex, index_name
from clip.formats.tar import (
    DeterministicTarWriter,
    archive_bytes,
    index_tar_members,
    member_bytes,
    split_member_name,
)

STALE_EXAMPLES = 5  # how many mismatching keys a refusal names


@dataclass(frozen=True)
class MemberLocation:
    offset: int  # byte offset of the member's data in its raw shard
    size: int


@dataclass(frozen=True)
class SampleLocation:
    raw_shard: int  # index into RawIndex.paths
    members: tuple[tuple[str, MemberLocation], ...]  # (extension, location), sorted by extension

    @property
    def tar_bytes(self) -> int:
        return sum(member_bytes(loc.size) for _, loc in self.members)


@dataclass
class RawIndex:
    paths: list[Path]  # local raw shard files
    samples: dict[str, SampleLocation]


@dataclass(frozen=True)
class ShardPlan:
    name: str
    keys: tuple[str, ...]
    expected_bytes: int


@dataclass(frozen=True)
class ShardFile:
    name: str
    path: Path  # where the finished tar lies locally
    samples: int
    bytes: int
    sha256: str
    index: str = ""  # its index's name (beside `path` when written locally)
    index_sha256: str = ""


def stale_keep_error(problems: dict[str, str], total: int, keep_path: str, input_dir: str) -> StaleInputError:
    """The refusal of a keep-list that the raw pool contradicts; `problems` is kept key -> what is wrong."""
    first = ", ".join(f"{key} ({problems[key]})" for key in sorted(problems)[:STALE_EXAMPLES])
    return StaleInputError(
        f"{keep_path} does not match the raw pool in {input_dir}: rerun `clip-pipeline dedup` "
        f"({len(problems)} of {total} kept samples differ; first: {first})")


def index_raw_members(raw_paths: dict[str, Path], keep: dict[str, str],
                      progress: Callable[[int, int], None] | None = None,
                      expected_sha256: dict[str, str] | None = None,
                      expected_caption: dict[str, str] | None = None, keep_path: str = KEEP_NAME,
                      input_dir: str = "the input") -> RawIndex:
    """Locate the jpg/txt/json members of every kept key.

    raw_paths: raw shard name -> local file; keep: kept key -> raw shard name (from keep.parquet).
    expected_sha256: kept key -> image sha256 (keep.parquet's `sha256` column); expected_caption: kept key ->
    caption digest (its `caption_digest` column). When given, every kept key's `{key}.json` is read and its
    `sha256` (and caption digest) compared; any kept key that is missing from the raw pool or whose sha256 or
    caption differs makes the whole call raise StaleInputError (naming `keep_path`, `input_dir` and the first
    such keys), before anything is written. Without it, a missing shard, sample or member raises naming the key.
    """
    verify = expected_sha256 is not None
    problems: dict[str, str] = {}  # kept key -> what contradicts the keep-list (verify mode only)
    wanted: dict[str, set[str]] = {}
    for key, shard in keep.items():
        if shard not in raw_paths:
            if verify:
                problems[key] = f"raw shard {shard} is not in the input"
                continue
            raise MissingInputError(f"kept sample {key!r} lives in raw shard {shard!r}, which is not in the input")
        wanted.setdefault(shard, set()).add(key)
    names = sorted(wanted)
    paths = [raw_paths[n] for n in names]
    samples: dict[str, SampleLocation] = {}
    for shard_idx, name in enumerate(names):
        found: dict[str, dict[str, MemberLocation]] = {}
        json_digests: dict[str, tuple[str | None, str | None]] = {}  # key -> (image sha256, caption digest)
        keys = wanted[name]
        for member, read in index_tar_members(raw_paths[name]):  # headers only, data skipped
            key, ext = split_member_name(member.name)
            if key in keys and ext in SAMPLE_MEMBERS:
                found.setdefault(key, {})[ext] = MemberLocation(member.offset, member.size)
                if verify and ext == "json":  # a few hundred bytes; images are never read
                    json_digests[key] = sample_json_digests(read())
        for key in keys:
            members = found.get(key, {})
            missing = [ext for ext in SAMPLE_MEMBERS if ext not in members]
            if verify:
                assert expected_sha256 is not None
                if not members:
                    problems[key] = f"not in raw shard {name}"
                elif missing:
                    problems[key] = f"lacks member(s) {', '.join(missing)} in raw shard {name}"
                elif json_digests.get(key, (None, None))[0] is None:
                    problems[key] = f"{key}.json in raw shard {name} has no readable sha256"
                elif json_digests[key][0] != expected_sha256.get(key):
                    problems[key] = "image sha256 differs"
                elif expected_caption is not None and json_digests[key][1] != expected_caption.get(key):
                    problems[key] = "caption differs"
                if key in problems:
                    continue
            elif missing:
                raise ValueError(f"raw shard {name}: kept sample {key!r} lacks member(s) {missing}")
            samples[key] = SampleLocation(shard_idx, tuple(sorted(members.items())))
        if progress is not None:
            progress(shard_idx + 1, len(names))
    if problems:
        raise stale_keep_error(problems, len(keep), keep_path, input_dir)
    return RawIndex(paths=paths, samples=samples)


def shuffled_keys(keys: list[str] | set[str], seed: int) -> list[str]:
    """A permutation of `keys` that depends only on the key set and the seed (not on input order)."""
    ordered = sorted(keys)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def plan_shards(order: list[str], index: RawIndex, samples_per_shard: int,
                max_shard_bytes: int) -> list[ShardPlan]:
    """Cut `order` into shards: a shard closes at `samples_per_shard` samples or when the next sample would
    push the finished archive past `max_shard_bytes` (a single sample larger than that gets a shard alone)."""
    plans: list[ShardPlan] = []
    current: list[str] = []
    content = 0

    def close() -> None:
        plans.append(ShardPlan(shard_name(len(plans)), tuple(current), archive_bytes(content)))

    for key in order:
        size = index.samples[key].tar_bytes
        if current and (len(current) >= samples_per_shard or archive_bytes(content + size) > max_shard_bytes):
            close()
            current, content = [], 0
        current.append(key)
        content += size
    if current:
        close()
    return plans


class _NullSink:
    """A write-only stream that keeps nothing (the hashing pass: bytes are hashed, never stored)."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def stream_shard(plan: ShardPlan, index: RawIndex, out: BinaryIO) -> DeterministicTarWriter:
    """Write one planned shard's tar bytes to `out`; returns the closed writer (its sha256 and bytes_written)."""
    handles: dict[int, int] = {}  # raw shard index -> OS file descriptor (pread: no shared file position)
    try:
        writer = DeterministicTarWriter(out, index_samples=True)
        for key in plan.keys:
            location = index.samples[key]
            fd = handles.get(location.raw_shard)
            if fd is None:
                fd = handles[location.raw_shard] = os.open(index.paths[location.raw_shard], os.O_RDONLY)
            for ext, member in location.members:
                data = os.pread(fd, member.size, member.offset)
                if len(data) != member.size:
                    raise OSError(f"raw shard {index.paths[location.raw_shard]} is truncated at {key}.{ext}")
                writer.add(f"{key}.{ext}", data)
        writer.close()
    finally:
        for fd in handles.values():
            os.close(fd)
    if writer.bytes_written != plan.expected_bytes:  # the size arithmetic and the bytes must agree
        raise AssertionError(f"{plan.name}: wrote {writer.bytes_written} bytes, planned {plan.expected_bytes}")
    return writer


def shard_index_of(plan: ShardPlan, writer: DeterministicTarWriter) -> ShardIndex:
    """The index of a shard just written by `writer` (closed)."""
    return ShardIndex(shard=plan.name, bytes=writer.bytes_written, sha256=writer.sha256, samples=tuple(writer.spans))


def shard_index_bytes(plan: ShardPlan, index: RawIndex) -> bytes:
    """A planned shard's index document, rebuilt by streaming the shard to nowhere (nothing is kept)."""
    return shard_index_of(plan, stream_shard(plan, index, _NullSink())).to_bytes()  # type: ignore[arg-type]


def hash_shard(plan: ShardPlan, index: RawIndex) -> ShardFile:
    """The size and sha256 a planned shard and its index will have, without writing them anywhere (`path` is
    empty)."""
    writer = stream_shard(plan, index, _NullSink())  # type: ignore[arg-type]
    shard_index = shard_index_of(plan, writer)
    return ShardFile(plan.name, Path(), len(plan.keys), writer.bytes_written, writer.sha256,
                     index_name(plan.name), shard_index.sha256_of_bytes())


def write_shard(plan: ShardPlan, index: RawIndex, dest: Path) -> ShardFile:
    """Write one planned shard to `dest`, then its index beside it, each through `clip.storage` (a temporary file
    in the same folder, fsynced, renamed when complete)."""
    written: list[DeterministicTarWriter] = []
    storage.write_stream(str(dest), lambda out: written.append(stream_shard(plan, index, out)))
    shard_index = shard_index_of(plan, written[0])
    index_bytes = shard_index.to_bytes()
    storage.write_bytes(str(dest.with_name(index_name(plan.name))), index_bytes)
    return ShardFile(plan.name, dest, len(plan.keys), written[0].bytes_written, written[0].sha256,
                     index_name(plan.name), hashlib.sha256(index_bytes).hexdigest())


def write_shards(plans: list[ShardPlan], index: RawIndex, dest_for: Callable[[str], Path] | None, workers: int = 2,
                 progress: Callable[[int, int], None] | None = None) -> list[ShardFile]:
    """Write every planned shard (a few in parallel: copying is I/O and hashing, both release the GIL);
    `dest_for` None: only hash them (`hash_shard`)."""
    results: dict[str, ShardFile] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="shard-writer") as pool:
        futures = [pool.submit(hash_shard, plan, index) if dest_for is None else
                   pool.submit(write_shard, plan, index, dest_for(plan.name)) for plan in plans]
        for done, future in enumerate(as_completed(futures), start=1):
            shard = future.result()
            results[shard.name] = shard
            if progress is not None:
                progress(done, len(plans))
    return [results[plan.name] for plan in plans]
