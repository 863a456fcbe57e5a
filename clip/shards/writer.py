"""Shuffled training shards from the raw pool, streamed: no image is held in memory beyond the one being copied.

1. `index_raw_members`: one pass over the headers of the raw shards holding kept keys records, per kept key,
   where each of its members' bytes lie (raw shard, offset, size). Tar headers are read; data is skipped.
2. `plan_shards`: the kept keys in a deterministic shuffled order (seeded permutation of the sorted keys, so
   samples from all sources and raw shards mix), cut into shards at `samples_per_shard` samples or
   `max_shard_bytes` bytes, whichever comes first (exact sizes are known from the index).
3. `write_shard`: copies each sample's members by offset into a byte-deterministic tar (temp name, then rename).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip.dedup.raw import MissingInputError, split_member_name
from clip.shards.tarwriter import DeterministicTarWriter, archive_bytes, member_bytes

SAMPLE_MEMBERS = ("jpg", "json", "txt")  # what a training sample carries, in the order written (sorted)


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


def index_raw_members(raw_paths: dict[str, Path], keep: dict[str, str],
                      progress: Callable[[int, int], None] | None = None) -> RawIndex:
    """Locate the jpg/txt/json members of every kept key.

    raw_paths: raw shard name -> local file; keep: kept key -> raw shard name (from keep.parquet).
    Raises naming the key when a kept sample or one of its members is missing.
    """
    wanted: dict[str, set[str]] = {}
    for key, shard in keep.items():
        if shard not in raw_paths:
            raise MissingInputError(f"kept sample {key!r} lives in raw shard {shard!r}, which is not in the input")
        wanted.setdefault(shard, set()).add(key)
    names = sorted(wanted)
    paths = [raw_paths[n] for n in names]
    samples: dict[str, SampleLocation] = {}
    for shard_idx, name in enumerate(names):
        found: dict[str, dict[str, MemberLocation]] = {}
        keys = wanted[name]
        with tarfile.open(raw_paths[name], mode="r:") as tar:  # seekable: headers only, data skipped
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key in keys and ext in SAMPLE_MEMBERS:
                    found.setdefault(key, {})[ext] = MemberLocation(member.offset_data, member.size)
        for key in keys:
            members = found.get(key, {})
            missing = [ext for ext in SAMPLE_MEMBERS if ext not in members]
            if missing:
                raise ValueError(f"raw shard {name}: kept sample {key!r} lacks member(s) {missing}")
            samples[key] = SampleLocation(shard_idx, tuple(sorted(members.items())))
        if progress is not None:
            progress(shard_idx + 1, len(names))
    return RawIndex(paths=paths, samples=samples)


def shuffled_keys(keys: list[str] | set[str], seed: int) -> list[str]:
    """A permutation of `keys` that depends only on the key set and the seed (not on input order)."""
    ordered = sorted(keys)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def plan_shards(order: list[str], index: RawIndex, samples_per_shard: int, max_shard_bytes: int,
                name_format: str = "shard-{:05d}.tar") -> list[ShardPlan]:
    """Cut `order` into shards: a shard closes at `samples_per_shard` samples or when the next sample would
    push the finished archive past `max_shard_bytes` (a single sample larger than that gets a shard alone)."""
    plans: list[ShardPlan] = []
    current: list[str] = []
    content = 0

    def close() -> None:
        plans.append(ShardPlan(name_format.format(len(plans)), tuple(current), archive_bytes(content)))

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


def write_shard(plan: ShardPlan, index: RawIndex, dest: Path, temp_suffix: str = ".tmp-writing") -> ShardFile:
    """Write one planned shard to `dest` (through a temp name in the same folder, renamed when complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{temp_suffix}")
    handles: dict[int, int] = {}  # raw shard index -> OS file descriptor (pread: no shared file position)
    try:
        with open(tmp, "wb") as out:
            writer = DeterministicTarWriter(out)
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
            out.flush()
            os.fsync(out.fileno())
        if writer.bytes_written != plan.expected_bytes:  # the size arithmetic and the bytes must agree
            raise AssertionError(f"{plan.name}: wrote {writer.bytes_written} bytes, planned {plan.expected_bytes}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for fd in handles.values():
            os.close(fd)
    return ShardFile(plan.name, dest, len(plan.keys), writer.bytes_written, writer.sha256)


def write_shards(plans: list[ShardPlan], index: RawIndex, dest_for: Callable[[str], Path], workers: int = 2,
                 progress: Callable[[int, int], None] | None = None) -> list[ShardFile]:
    """Write every planned shard (a few in parallel: copying is I/O and hashing, both release the GIL)."""
    results: dict[str, ShardFile] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="shard-writer") as pool:
        futures = [pool.submit(write_shard, plan, index, dest_for(plan.name)) for plan in plans]
        for done, future in enumerate(as_completed(futures), start=1):
            shard = future.result()
            results[shard.name] = shard
            if progress is not None:
                progress(done, len(plans))
    return [results[plan.name] for plan in plans]
