"""The data versions of a shard output: list them, and prune those no kept run needs (`clip-pipeline data`).

    from clip.shards import versions
    versions.list_versions("data/shards")                    # [DataVersion(data_version, shards, bytes, ...)]
    versions.prune("data/shards", keep=2, runs_dir="models/runs")   # PruneResult(removed, kept)

A version is kept when any of these holds, and removed otherwise:
- it is the one `latest.json` names (never removed);
- it is among the `keep` most recently published complete versions;
- a run under `runs_dir` (default `models/runs`, one sub-folder per run) names it. A run names a version by its
  folder name when that ends in `-<data_version[:12]>` (the default run location,
  `models/runs/<model>-<data_version[:12]>/`), and otherwise by the `data_version` of its newest checkpoint
  (`final.pt`, else the highest `step-*.pt`: its metadata sidecar when it has one that matches its size, else
  the checkpoint itself, read through clip.formats.checkpoint). A run whose folder holds
  no checkpoint yet and has another name (a custom `train.output` under `runs_dir` that has just started) is
  not seen: prune while no such run is starting, or keep enough versions;
- its folder has no manifest (an interrupted or running publish): it is listed as incomplete and never removed.

Removal deletes the version's `manifest.json` first, so a half-removed version is never mistaken for a
complete one, then the rest of its folder. Other versions' objects and the pointer are never touched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from clip import storage
from clip.config import StorageConfig
from clip.formats.checkpoint import (
    FINAL_NAME,
    RUNS_DIR,
    meta_describes,
    meta_name,
    parse_checkpoint,
    parse_checkpoint_meta,
    parse_step,
)
from clip.formats.errors import FormatError
from clip.formats.manifest import MANIFEST_NAME, is_data_version, read_pointer, version_location
from clip.shards.publish import existing_manifest


@dataclass(frozen=True)
class DataVersion:
    data_version: str
    location: str  # its folder
    shards: int
    samples: int
    bytes: int  # all objects in its folder
    published_at: str  # from its manifest ("" when unknown)
    latest: bool  # the one latest.json names
    complete: bool  # its manifest is there


@dataclass
class PruneResult:
    removed: list[DataVersion] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # data version -> why


def _children(root: str, storage_cfg: StorageConfig | None) -> dict[str, list[storage.ObjectInfo]]:
    """Objects under `root`, grouped by the first path component below it."""
    base = root.rstrip("/")
    groups: dict[str, list[storage.ObjectInfo]] = {}
    for info in storage.list_objects(base, storage_cfg):
        rel = info.uri[len(base):].lstrip("/")
        if "/" in rel:
            groups.setdefault(rel.split("/", 1)[0], []).append(info)
    return groups


def list_versions(root: str, storage_cfg: StorageConfig | None = None) -> list[DataVersion]:
    """Every version folder under a shard output, oldest publish first."""
    pointer = read_pointer(root, storage_cfg)
    found: list[DataVersion] = []
    for name, objects in _children(root, storage_cfg).items():
        if not is_data_version(name):
            continue
        location = version_location(root.rstrip("/"), name)
        manifest = existing_manifest(location, storage_cfg)
        found.append(DataVersion(
            data_version=name, location=location, shards=len(manifest.shards) if manifest else 0,
            samples=manifest.total_samples if manifest else 0, bytes=sum(o.size for o in objects),
            published_at=manifest.published_at if manifest else "",
            latest=pointer is not None and pointer.data_version == name, complete=manifest is not None))
    return sorted(found, key=lambda v: (v.published_at, v.data_version))


def _newest_checkpoint(objects: list[storage.ObjectInfo]) -> storage.ObjectInfo | None:
    by_name = {storage.basename(o.uri): o for o in objects}
    if FINAL_NAME in by_name:
        return by_name[FINAL_NAME]
    steps = [(step, name) for name in by_name if (step := parse_step(name)) is not None]
    return by_name[max(steps)[1]] if steps else None


def _checkpoint_data_version(newest: storage.ObjectInfo, objects: list[storage.ObjectInfo],
                             storage_cfg: StorageConfig | None) -> str:
    """The data version a checkpoint names: from its sidecar when one describes it (no torch.load), else from
    the checkpoint read whole."""
    name = storage.basename(newest.uri)
    sidecar = next((o.uri for o in objects if storage.basename(o.uri) == meta_name(name)), None)
    if sidecar is not None:
        try:
            meta = parse_checkpoint_meta(storage.read_bytes(sidecar, storage_cfg), sidecar)
        except FormatError:
            meta = None
        if meta is not None and meta_describes(meta, name, newest.size):
            return str(meta.get("data_version"))
    return str(parse_checkpoint(storage.read_bytes(newest.uri, storage_cfg), newest.uri).get("data_version"))


def versions_named_by_runs(runs_dir: str, versions: list[str],
                           storage_cfg: StorageConfig | None = None) -> dict[str, list[str]]:
    """data version -> the run folders under `runs_dir` that name it (see the module doc)."""
    named: dict[str, list[str]] = {}
    if not storage.is_s3_uri(runs_dir) and not storage.to_local_path(runs_dir).is_dir():
        return named
    for run, objects in sorted(_children(runs_dir, storage_cfg).items()):
        suffix = run.rsplit("-", 1)[-1]
        matches = [v for v in versions if len(suffix) == 12 and v.startswith(suffix)]
        if not matches:
            newest = _newest_checkpoint(objects)
            if newest is not None:
                matches = [_checkpoint_data_version(newest, objects, storage_cfg)]
        for version in matches:
            named.setdefault(version, []).append(storage.join(runs_dir, run))
    return named


def remove_version(version: DataVersion, storage_cfg: StorageConfig | None = None) -> None:
    """Delete one version's folder: its manifest first, then everything else in it."""
    storage.delete(storage.join(version.location, MANIFEST_NAME), storage_cfg)
    if storage.is_s3_uri(version.location):
        for info in storage.list_objects(version.location, storage_cfg):
            storage.delete(info.uri, storage_cfg)
    else:
        shutil.rmtree(storage.to_local_path(version.location), ignore_errors=False)


def prune(root: str, keep: int = 1, runs_dir: str = RUNS_DIR, storage_cfg: StorageConfig | None = None,
          dry_run: bool = False) -> PruneResult:
    """Remove the complete versions that are not latest, not among the `keep` newest and named by no run."""
    if keep < 0:
        raise ValueError(f"--keep must be 0 or more, got {keep}")
    found = list_versions(root, storage_cfg)
    named = versions_named_by_runs(runs_dir, [v.data_version for v in found], storage_cfg)
    complete = [v for v in found if v.complete]
    newest = {v.data_version for v in complete[len(complete) - keep:]} if keep else set()
    result = PruneResult()
    for version in found:
        if version.latest:
            result.kept[version.data_version] = "latest"
        elif not version.complete:
            result.kept[version.data_version] = "incomplete (no manifest): left alone"
        elif version.data_version in named:
            result.kept[version.data_version] = "named by " + ", ".join(named[version.data_version])
        elif version.data_version in newest:
            result.kept[version.data_version] = f"among the {keep} newest"
        else:
            result.removed.append(version)
            if not dry_run:
                remove_version(version, storage_cfg)
    return result
