"""Training checkpoints on the storage layer (local folder or s3:// prefix), format in docs/formats.md.

`step-NNNNNNNN.pt` every `checkpoint_every` steps and `final.pt` at the end: a plain dict of tensors and
primitive types (loadable with `torch.load(..., weights_only=True)`), serialised into memory and written with
`clip.storage.write_bytes` (atomic: a reader sees the whole object or nothing). Only the newest
`keep_checkpoints` step checkpoints are kept. `latest_checkpoint()` finds the newest loadable one, so a run
started again with the same output resumes by itself. A storage error while listing or reading checkpoints
(clip.storage.StorageError, OSError) propagates: falling back to an older checkpoint, or to none, would silently
retrain or restart. Only a checkpoint whose bytes do not parse (corrupt, or a foreign object) is skipped, with a
warning.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from clip import storage
from clip.config import StorageConfig
from clip.formats.checkpoint import FINAL_NAME, checkpoint_bytes, parse_checkpoint, parse_step, step_name

__all__ = ["FINAL_NAME", "latest_checkpoint", "list_step_checkpoints", "load_checkpoint_dict", "prune_checkpoints",
           "rng_state", "save_checkpoint", "set_rng_state", "step_name"]


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


def save_checkpoint(uri: str, checkpoint: dict[str, Any], storage_cfg: StorageConfig | None = None) -> None:
    storage.write_bytes(uri, checkpoint_bytes(checkpoint), storage_cfg)


def load_checkpoint_dict(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    return parse_checkpoint(storage.read_bytes(uri, storage_cfg), uri)


def _parse_or_skip(uri: str, storage_cfg: StorageConfig | None) -> dict[str, Any] | None:
    """The checkpoint at `uri`; None (with a warning) when its bytes do not parse. Reading is outside the
    guard: a storage error propagates."""
    data = storage.read_bytes(uri, storage_cfg)
    try:
        return parse_checkpoint(data, uri)
    except MemoryError:
        raise
    except Exception as exc:  # in-memory bytes only: corrupt, truncated, or not a checkpoint (no I/O here)
        warnings.warn(f"{uri}: skipped, not a loadable checkpoint ({type(exc).__name__}: {exc})".replace("\n", " "),
                      stacklevel=3)
        return None


def list_step_checkpoints(output: str, storage_cfg: StorageConfig | None = None) -> list[tuple[int, str]]:
    """(step, uri) of the step checkpoints directly in `output`, oldest first."""
    found = []
    for info in storage.get_storage(output, storage_cfg).list(output):
        name = storage.basename(info.uri)
        rel = info.uri[len(output.rstrip("/")) + 1:] if info.uri.startswith(output.rstrip("/")) else name
        step = parse_step(name)
        if step is not None and "/" not in rel:
            found.append((step, info.uri))
    return sorted(found)


def latest_checkpoint(output: str, storage_cfg: StorageConfig | None = None) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint that loads (highest step; final.pt on a tie), or None.

    final.pt is not always the newest: a finished run continued with more epochs resumes from it and then
    writes step checkpoints beyond its step; after a crash those are where to resume."""
    final: tuple[str, dict[str, Any]] | None = None
    final_uri = storage.join(output, FINAL_NAME)
    if storage.exists(final_uri, storage_cfg):
        final_dict = _parse_or_skip(final_uri, storage_cfg)
        final = (final_uri, final_dict) if final_dict is not None else None
    final_step = int(final[1].get("step", 0)) if final is not None else -1
    for step, uri in reversed(list_step_checkpoints(output, storage_cfg)):
        if step <= final_step:
            break
        checkpoint = _parse_or_skip(uri, storage_cfg)
        if checkpoint is not None:
            return uri, checkpoint
    return final


def prune_checkpoints(output: str, keep: int, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Delete all but the newest `keep` step checkpoints; returns the deleted URIs."""
    steps = list_step_checkpoints(output, storage_cfg)
    doomed = [uri for _step, uri in steps[: max(0, len(steps) - keep)]]
    for uri in doomed:
        storage.delete(uri, storage_cfg)
    return doomed
