"""Training checkpoints on the storage layer (local folder or s3:// prefix), format in docs/formats.md.

`step-NNNNNNNN.pt` every `checkpoint_every` steps and `final.pt` at the end: a plain dict of tensors and
primitive types (loadable with `torch.load(..., weights_only=True)`), serialised into memory and written with
`clip.storage.write_bytes` (atomic: a reader sees the whole object or nothing). Only the newest
`keep_checkpoints` step checkpoints are kept. `latest_checkpoint()` finds the newest loadable one, so a run
started again with the same output resumes by itself. A storage error while listing or reading checkpoints
(clip.storage.StorageError, OSError) propagates: falling back to an older checkpoint, or to none, would silently
retrain or restart. Only a damaged checkpoint (bytes that do not parse, or differ from the content_sha256
stored in it or, when `find_latest` is asked to verify it, from its sidecar's sha256) is passed over for the one
before it, with a warning naming the damaged file(s) and the one chosen instead.
`remove_stale_temp_files` clears a local run folder of the temp files of writes a kill interrupted.

Each checkpoint gets its metadata sidecar (clip.formats.checkpoint `meta_name`), written after it and removed
before it is overwritten or deleted. `find_latest()` chooses from the sidecars alone (a few KiB each, no
torch.load) and reads a checkpoint whole only where the sidecar is missing, unreadable or names other bytes
(another size than the object listed); `FoundCheckpoint.load` then refuses bytes that differ from what the sidecar
described. Every read of a checkpoint here goes through clip.formats.checkpoint `read_checkpoint`, the reader
export and evaluation use (checksums checked, one-line errors naming the file).
"""

from __future__ import annotations

import logging
import random
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from clip import storage
from clip.config import StorageConfig
from clip.formats.checkpoint import (
    FINAL_NAME,
    checkpoint_bytes,
    checkpoint_meta,
    checkpoint_meta_bytes,
    meta_describes,
    meta_name,
    parse_checkpoint_meta,
    parse_step,
    read_checkpoint,
    step_name,
)
from clip.formats.errors import FormatError
from clip.storage.local import TMP_MARK

log = logging.getLogger(__name__)

__all__ = ["FINAL_NAME", "FoundCheckpoint", "find_latest", "latest_checkpoint", "list_step_checkpoints",
           "meta_uri", "prune_checkpoints", "read_checkpoint_meta",
           "remove_stale_temp_files", "rng_state", "save_checkpoint", "set_rng_state", "step_name"]


def rng_state() -> dict[str, Any]:
    """torch / numpy / python RNG states as tensors and primitive types (weights_only-safe)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def meta_uri(checkpoint_uri: str) -> str:
    """Where the metadata sidecar of the checkpoint at `checkpoint_uri` lies (beside it)."""
    name = storage.basename(checkpoint_uri)
    return checkpoint_uri[: len(checkpoint_uri) - len(name)] + meta_name(name)


def save_checkpoint(uri: str, checkpoint: dict[str, Any], storage_cfg: StorageConfig | None = None) -> None:
    """Write the checkpoint, then its sidecar (an older sidecar at the same name goes first, so no sidecar ever
    describes bytes that are not there)."""
    raw = checkpoint_bytes(checkpoint)
    storage.delete(meta_uri(uri), storage_cfg)
    storage.write_bytes(uri, raw, storage_cfg)
    storage.write_bytes(meta_uri(uri), checkpoint_meta_bytes(checkpoint, raw, storage.basename(uri)), storage_cfg)


def read_checkpoint_meta(uri: str, size: int | None,
                         storage_cfg: StorageConfig | None = None) -> dict[str, Any] | None:
    """The sidecar of the checkpoint at `uri` when there is one that describes an object of `size` bytes (the
    listed size; None: not checked); None otherwise. A storage error other than "not found" propagates."""
    sidecar = meta_uri(uri)
    try:
        raw = storage.read_bytes(sidecar, storage_cfg)
    except FileNotFoundError:  # clip.storage.ObjectNotFound is one too
        return None
    try:
        meta = parse_checkpoint_meta(raw, sidecar)
    except FormatError as exc:
        warnings.warn(f"{exc}; reading the checkpoint whole instead", stacklevel=2)
        return None
    if not meta_describes(meta, storage.basename(uri), size):
        return None  # it describes other bytes (replaced since): the checkpoint itself is the authority
    return meta


@dataclass(frozen=True)
class FoundCheckpoint:
    """The checkpoint to resume from: its location, its metadata (clip.formats.checkpoint META_KEYS, plus
    `sha256` when read from the sidecar) and, when it had to be read whole to choose it, the checkpoint."""

    uri: str
    meta: dict[str, Any]
    checkpoint: dict[str, Any] | None = None

    def load(self, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
        """The whole checkpoint (read now unless it already was; checked against the sidecar's sha256 and its own
        checksum: FormatError naming the file when either differs)."""
        if self.checkpoint is not None:
            return self.checkpoint
        return read_checkpoint(self.uri, storage_cfg, require=(), expected_sha256=self.meta.get("sha256")).content


def _meta_or_parse(uri: str, size: int | None, storage_cfg: StorageConfig | None,
                   damaged: list[str]) -> FoundCheckpoint | None:
    meta = read_checkpoint_meta(uri, size, storage_cfg)
    if meta is not None:
        return FoundCheckpoint(uri, meta)
    checkpoint = _parse_or_skip(uri, storage_cfg, damaged)
    return None if checkpoint is None else FoundCheckpoint(uri, checkpoint_meta(checkpoint), checkpoint)


def _parse_or_skip(uri: str, storage_cfg: StorageConfig | None, damaged: list[str]) -> dict[str, Any] | None:
    """The checkpoint at `uri`; None (with a warning, `uri` added to `damaged`) when its bytes do not parse or
    differ from its own checksum (read_checkpoint's FormatError). A storage error, a missing object included,
    propagates."""
    try:
        return read_checkpoint(uri, storage_cfg, require=()).content
    except FormatError as exc:  # corrupt, truncated, or not a checkpoint
        warnings.warn(f"{exc}; skipped".replace("\n", " "), stacklevel=4)  # the error names the file
        damaged.append(uri)
        return None


def _loaded_or_skip(found: FoundCheckpoint | None, storage_cfg: StorageConfig | None,
                    damaged: list[str]) -> FoundCheckpoint | None:
    """`found` read whole now (checked against its sidecar and its own checksum); None (with a warning, its URI
    added to `damaged`) when its bytes fail those checks. A storage error propagates."""
    if found is None or found.checkpoint is not None:
        return found
    try:
        return replace(found, checkpoint=found.load(storage_cfg))
    except FormatError as exc:
        warnings.warn(f"{found.uri}: skipped, damaged ({exc})", stacklevel=4)
        damaged.append(found.uri)
        return None


def _checkpoint_objects(output: str, storage_cfg: StorageConfig | None) -> dict[str, tuple[str, int]]:
    """name -> (uri, size) of the objects directly in `output`."""
    found = {}
    for info in storage.get_storage(output, storage_cfg).list(output):
        name = storage.basename(info.uri)
        rel = info.uri[len(output.rstrip("/")) + 1:] if info.uri.startswith(output.rstrip("/")) else name
        if "/" not in rel:
            found[name] = (info.uri, info.size)
    return found


def list_step_checkpoints(output: str, storage_cfg: StorageConfig | None = None) -> list[tuple[int, str]]:
    """(step, uri) of the step checkpoints directly in `output`, oldest first."""
    objects = _checkpoint_objects(output, storage_cfg)
    return sorted((step, uri) for name, (uri, _size) in objects.items() if (step := parse_step(name)) is not None)


def find_latest(output: str, storage_cfg: StorageConfig | None = None,
                verify: Callable[[FoundCheckpoint], bool] | None = None) -> FoundCheckpoint | None:
    """The newest loadable checkpoint (highest step; final.pt on a tie), or None, chosen from the sidecars where
    there are (nothing is read whole then), from the checkpoints themselves where not.

    final.pt is not always the newest: a finished run continued with more epochs resumes from it and then
    writes step checkpoints beyond its step; after a crash those are where to resume.

    `verify(found)` True: that candidate is read whole and checked now (its sidecar's sha256 and its own
    checksum) and passed over for the next older one when damaged. Whenever a damaged checkpoint was passed
    over, a warning names it and the checkpoint chosen instead."""
    objects = _checkpoint_objects(output, storage_cfg)
    damaged: list[str] = []
    final = _meta_or_parse(*objects[FINAL_NAME], storage_cfg, damaged) if FINAL_NAME in objects else None
    final_step = int(final.meta.get("step", 0)) if final is not None else -1
    steps = sorted(((step, uri, size) for name, (uri, size) in objects.items()
                    if (step := parse_step(name)) is not None), reverse=True)

    def candidates() -> Iterator[FoundCheckpoint | None]:
        """Newest first: steps beyond final.pt, final.pt, then (only if it is damaged) the steps before it."""
        yield from (_meta_or_parse(uri, size, storage_cfg, damaged) for step, uri, size in steps if step > final_step)
        yield final
        yield from (_meta_or_parse(uri, size, storage_cfg, damaged) for step, uri, size in steps if step <= final_step)

    chosen = None
    for found in candidates():
        if found is not None and verify is not None and verify(found):
            found = _loaded_or_skip(found, storage_cfg, damaged)
        if found is not None:
            chosen = found
            break
    if damaged:
        warnings.warn(f"damaged checkpoint(s) passed over: {', '.join(damaged)}; "
                      f"{'using ' + chosen.uri if chosen else 'no good checkpoint left: starting from step 0'}",
                      stacklevel=2)
    return chosen


def latest_checkpoint(output: str, storage_cfg: StorageConfig | None = None) -> tuple[str, dict[str, Any]] | None:
    """(uri, whole checkpoint) of `find_latest`'s choice, or None."""
    found = find_latest(output, storage_cfg, verify=lambda _found: True)
    return None if found is None else (found.uri, found.load(storage_cfg))


def prune_checkpoints(output: str, keep: int, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Delete all but the newest `keep` step checkpoints (each sidecar first); returns the deleted URIs."""
    steps = list_step_checkpoints(output, storage_cfg)
    doomed = [uri for _step, uri in steps[: max(0, len(steps) - keep)]]
    for uri in doomed:
        storage.delete(meta_uri(uri), storage_cfg)
        storage.delete(uri, storage_cfg)
    return doomed


# clip.storage's local temporary names, `.<final name>.tmp-<12 hex>` (clip/storage/local.py), and nothing else.
_STALE_TEMP = re.compile(r"\..+" + re.escape(TMP_MARK) + r"[0-9a-f]{12}")


def remove_stale_temp_files(output: str) -> list[str]:
    """Remove the temporary files an interrupted write (a kill mid-checkpoint) left directly in the local run
    folder `output`; only clip.storage's own temp naming matches. Call before the run writes anything (no
    write of this run can be in flight). Returns the removed paths; S3 (no temp objects) and a missing folder
    give []."""
    if storage.is_s3_uri(output):
        return []
    folder = storage.to_local_path(output)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and _STALE_TEMP.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted write in %s: %s", len(removed), output,
                    ", ".join(storage.basename(p) for p in removed))
    return removed
