"""Training checkpoints (docs/formats.md "Checkpoints"): names, keys, and their bytes.

`step-NNNNNNNN.pt` every `train.checkpoint_every` steps and `final.pt` at the end, each a plain dict of tensors and
primitive types, loadable with `torch.load(..., weights_only=True)`:
- `MODEL_KEYS` (every checkpoint): `model` (state dict in clip.model's OpenAI layout), `model_config`
  (`CLIPConfig.to_dict()`), `tokenizer` (`Tokenizer.to_json()`), `train_config` (the resolved train section);
- `TRAINING_STATE_KEYS` (what a resume needs): optimizer, scheduler, step, samples_seen, data_state, rng,
  data_version; `mlflow_run_id`, the MLflow run of the training segment that wrote it (a resumed segment is a
  run of its own that names it in its `clip.resumed_from_run` tag).
A checkpoint is therefore self-contained: export and evaluation need nothing but its location. torch is imported
only by the functions that need it, so reading names here stays light.

Beside each checkpoint, its metadata sidecar `step-NNNNNNNN.meta.json` / `final.meta.json` (`meta_name`): a small
JSON object with `META_KEYS` (step, samples_seen, data_state, data_version, mlflow_run_id, train_config,
model_config) and the checkpoint's name, size and SHA-256, so choosing and checking a checkpoint to resume from
needs no torch.load of hundreds of MiB. Written after its checkpoint (and removed before the checkpoint is
overwritten or deleted), so a sidecar never names a checkpoint that is not complete; its size and SHA-256 tie
it to the exact bytes it describes. Checkpoints without one (written before sidecars, or a crash between the two
writes) are read whole instead.

Each checkpoint also carries its own checksum, `content_sha256` (`CONTENT_SHA_KEY`): the SHA-256 of its content
(`content_digest`: every tensor's dtype, shape and bytes and every other value, in a fixed order), so a checkpoint
read without its sidecar is still checked: a flipped byte inside a tensor, which torch.load does not notice, is
refused by `parse_checkpoint` (FormatError naming the file). Checkpoints written before this key are not checked.

From a reference to a model, one way for every stage (export, evaluate, tests; local paths and s3:// alike):
`resolve_checkpoint` (a checkpoint file, a run folder, a folder holding one run, or a data version's `TrainedRun`
-> the checkpoint's URI, by names only), `read_checkpoint` (its bytes, checked, -> `CheckpointFile`), then
`clip.model.build_from_checkpoint(file.content, file.uri)` -> (CLIP, Tokenizer). The train stage's resume reads
through `read_checkpoint` too.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from clip.formats.errors import FormatError
from clip.formats.jsondoc import parse_format_doc

STEP_PATTERN = re.compile(r"step-(\d{8})\.pt$")
FINAL_NAME = "final.pt"
LOSS_CURVE_NAME = "loss_curve.csv"  # in the run folder: step,loss,lr,logit_scale,samples_per_s per log window
EPOCH_CURVE_NAME = "epoch_curve.csv"  # in the run folder: step,epoch,loss and per-set zero-shot top-1 per epoch
RUN_TOKENIZER_NAME = "tokenizer.json"  # in the run folder: the run's tokenizer (Tokenizer.to_json())
RUN_METRICS_NAME = "metrics.json"  # in the run folder: a finished run's final figures (clip.train.report)
MODEL_KEYS = ("model", "model_config", "tokenizer", "train_config")
BUILD_KEYS = ("model", "model_config", "tokenizer")  # what clip.model.build_from_checkpoint needs
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "step", "samples_seen", "data_state", "rng", "data_version")
RUNS_DIR = "models/runs"  # where runs go when train.output is not set: one folder per (model, data version)
MLFLOW_RUN_KEY = "mlflow_run_id"  # the MLflow run of the segment that wrote it (None without tracking)
CONTENT_SHA_KEY = "content_sha256"  # the checkpoint's checksum of the rest of its content (content_digest)


META_SUFFIX = ".meta.json"
META_FORMAT = "clip-pipeline/checkpoint-meta/v1"
# What the sidecar repeats from its checkpoint: everything a resume checks or restores besides tensors.
META_KEYS = ("step", "samples_seen", "data_state", "data_version", MLFLOW_RUN_KEY, "train_config", "model_config")


def meta_name(checkpoint_name: str) -> str:
    """The sidecar of `step-00000100.pt` is `step-00000100.meta.json` (of `final.pt`, `final.meta.json`)."""
    stem = checkpoint_name[:-len(".pt")] if checkpoint_name.endswith(".pt") else checkpoint_name
    return stem + META_SUFFIX


def checkpoint_meta_bytes(checkpoint: dict[str, Any], raw: bytes, name: str) -> bytes:
    """The sidecar of the checkpoint `name` whose serialised bytes are `raw` (keys it lacks are left out)."""
    doc: dict[str, Any] = {"format": META_FORMAT, "checkpoint": name, "bytes": len(raw),
                           "sha256": hashlib.sha256(raw).hexdigest()}
    doc.update(checkpoint_meta(checkpoint))
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")


def parse_checkpoint_meta(raw: bytes, uri: str) -> dict[str, Any]:
    """A sidecar's fields: `checkpoint`, `bytes`, `sha256` and the META_KEYS it holds; FormatError naming `uri`."""
    doc = parse_format_doc(raw, uri, META_FORMAT, "checkpoint metadata sidecar")
    try:
        doc["bytes"], doc["sha256"], doc["checkpoint"] = int(doc["bytes"]), str(doc["sha256"]), str(doc["checkpoint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{uri}: not a valid checkpoint metadata sidecar ({exc!r})") from None
    return doc


def checkpoint_meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The META_KEYS of a loaded checkpoint: what a sidecar holds, for a checkpoint read whole."""
    return {key: checkpoint[key] for key in META_KEYS if key in checkpoint}


def meta_describes(meta: dict[str, Any], name: str, size: int | None) -> bool:
    """Whether the parsed sidecar `meta` describes the checkpoint `name` of `size` bytes (None: size not
    checked); False means it describes other bytes (replaced since), so the checkpoint itself is the authority."""
    return meta["checkpoint"] == name and (size is None or meta["bytes"] == size)


def default_run_location(model: str, data_version: str, runs_dir: str = RUNS_DIR, loss: str = "clip") -> str:
    """`models/runs/<model>-<data_version[:12]>` (`<model>-<loss>-<...>` for a loss other than clip): new data
    starts a new run by itself, the same data resumes, and a run with another loss is another run."""
    from clip import storage

    name = model if loss == "clip" else f"{model}-{loss}"
    return storage.join(runs_dir, f"{name}-{data_version[:12]}")


@dataclass(frozen=True)
class TrainedRun:
    """The training run of one data version: its folder, and the data version its checkpoints must hold."""

    folder: str
    data_version: str


def run_for_data(data: str, model: str, *, loss: str = "clip", output: str | None = None, runs_dir: str = RUNS_DIR,
                 storage_cfg: Any = None, key: str = "train.data") -> TrainedRun:
    """The run that trains (or trained) `model` on the data version `data` names now: a shard output root through
    its latest.json (read once), a version folder, or a manifest. Its folder is `output` when set (train.output),
    else `default_run_location` under `runs_dir`: the train stage's own rule, so that export and evaluation take
    the run of the data version they are asked about, never merely the newest file. MissingInputError naming
    `key` when there is no manifest."""
    from clip.formats.errors import MissingInputError
    from clip.formats.manifest import read_manifest

    try:
        version = read_manifest(data, storage_cfg).data_version
    except MissingInputError as exc:
        raise MissingInputError(f"{exc} ({key})") from None
    return TrainedRun(output or default_run_location(model, version, runs_dir, loss), version)


class AmbiguousCheckpointError(ValueError):
    """A reference that names more than one training run (the message lists them): name one."""


def choose_checkpoint(names: Iterable[str]) -> str | None:
    """Of the file names directly in a run folder, the checkpoint that stands for the run: `final.pt` when there
    is one, else the `step-NNNNNNNN.pt` with the highest step number; None when there is neither. Names only:
    never a file's age (mtime), which a copy or a sync changes and S3 does not keep."""
    names = set(names)
    if FINAL_NAME in names:
        return FINAL_NAME
    steps = [(step, name) for name in names if (step := parse_step(name)) is not None]
    return max(steps)[1] if steps else None


def _listing(folder: str, storage_cfg: Any) -> tuple[bool, dict[str, list[str]]]:
    """(whether `folder` is itself an object, {sub-folder ("" for `folder` itself): names of the objects directly
    in it}) for `folder` and the folders directly under it, from one listing (the same for local and S3)."""
    from clip import storage

    inside: dict[str, list[str]] = {}
    is_object = False
    for info in storage.list_objects(folder, storage_cfg):
        if info.uri.rstrip("/") == folder:
            is_object = True
            continue
        if not info.uri.startswith(folder + "/"):
            continue
        parts = info.uri[len(folder) + 1:].split("/")
        if len(parts) <= 2:
            inside.setdefault("" if len(parts) == 1 else parts[0], []).append(parts[-1])
    return is_object, inside


def resolve_checkpoint(reference: str | TrainedRun, storage_cfg: Any = None, key: str = "checkpoint") -> str:
    """The checkpoint file a reference names, local or s3:// by the same rule (one listing, names only):
    - a file (`.../final.pt`, `.../step-00000100.pt`, any other name): itself;
    - a run folder (checkpoints directly in it): the one `choose_checkpoint` picks, `final.pt` else the highest
      step;
    - a folder of runs (no checkpoint directly in it, run folders directly under it): its one run's, as above;
      two or more runs: AmbiguousCheckpointError listing them (name the run, or its file);
    - a `TrainedRun` (`run_for_data`: the run of a data version): its folder's `final.pt` only, since a data
      version's model is its finished run (a run killed part-way is resumed by the train stage, not exported).
    MissingInputError naming the reference and the config `key` when it names no checkpoint."""
    from clip import storage
    from clip.formats.errors import MissingInputError

    if isinstance(reference, TrainedRun):
        folder = reference.folder.rstrip("/")
        _, inside = _listing(folder, storage_cfg)
        if FINAL_NAME not in inside.get("", []):
            raise MissingInputError(f"no finished training run for data version {reference.data_version[:12]}: no "
                                    f"{FINAL_NAME} in {folder} (run the train stage, or set {key})")
        return storage.join(folder, FINAL_NAME)
    folder = reference.rstrip("/") or reference
    is_object, inside = _listing(folder, storage_cfg)
    if is_object:
        return folder
    if folder.endswith(".pt") and not inside:
        raise MissingInputError(f"checkpoint {folder} does not exist ({key})")
    name = choose_checkpoint(inside.get("", []))
    if name is not None:
        return storage.join(folder, name)
    runs = {run: chosen for run, names in sorted(inside.items()) if run and (chosen := choose_checkpoint(names))}
    if len(runs) > 1:
        shown = ", ".join(list(runs)[:5]) + (f" (+{len(runs) - 5} more)" if len(runs) > 5 else "")
        raise AmbiguousCheckpointError(f"{folder} ({key}) holds {len(runs)} training runs ({shown}): name the run "
                                       "folder or its checkpoint file")
    if runs:
        [(run, name)] = runs.items()
        return storage.join(folder, run, name)
    raise MissingInputError(f"no checkpoint in {folder} ({key}): neither {FINAL_NAME} nor a step checkpoint in it "
                            "or in a run folder directly under it (is the run missing, or not started?)")


def checkpoint_data_version(uri: str, storage_cfg: Any = None, key: str = "checkpoint") -> str | None:
    """The data version the checkpoint at `uri` was trained on: from its sidecar when it has one that names it,
    else from the checkpoint itself (None when it records none)."""
    from clip import storage
    from clip.formats.manifest import parent_location

    name = storage.basename(uri)
    sidecar = storage.join(parent_location(uri), meta_name(name))
    try:
        meta = parse_checkpoint_meta(storage.read_bytes(sidecar, storage_cfg), sidecar)
        if meta_describes(meta, name, None):
            return meta.get("data_version")
    except (FileNotFoundError, FormatError):
        pass  # no sidecar (or not a valid one): the checkpoint itself is the authority
    return read_checkpoint(uri, storage_cfg, key=key).content.get("data_version")


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def parse_step(name: str) -> int | None:
    """100 from `step-00000100.pt`; None for any other name (final.pt included)."""
    match = STEP_PATTERN.match(name)
    return int(match.group(1)) if match else None


def _feed(digest: Any, value: Any) -> None:
    """Hash `value` with its type and structure: the same content always gives the same bytes."""
    import torch

    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{value.dtype}{tuple(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")  # no copy: the buffer itself
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__}{len(text)}:{text}".encode())


def content_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's content, its `content_sha256` left out."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in checkpoint.items() if key != CONTENT_SHA_KEY})
    return digest.hexdigest()


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    """The serialised checkpoint, with its `content_sha256` (computed now) inside."""
    import torch

    buffer = io.BytesIO()
    torch.save({**checkpoint, CONTENT_SHA_KEY: content_digest(checkpoint)}, buffer)
    return buffer.getvalue()


def parse_checkpoint(data: bytes, uri: str = "checkpoint", require: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint dict (weights only, on the CPU); FormatError naming `uri` when it lacks a required key or
    its content differs from its own `content_sha256`."""
    import torch

    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise FormatError(f"{uri}: not a clip-pipeline checkpoint (a {type(checkpoint).__name__}, not a dict)")
    stored = checkpoint.get(CONTENT_SHA_KEY)
    if stored is not None and (actual := content_digest(checkpoint)) != stored:
        raise FormatError(f"{uri}: damaged: its content differs from the {CONTENT_SHA_KEY} stored in it "
                          f"({actual[:12]}... != {str(stored)[:12]}...)")
    missing = [key for key in require if key not in checkpoint]
    if missing:
        raise FormatError(f"{uri}: checkpoint lacks key(s) {missing} (see docs/formats.md \"Checkpoints\")")
    return checkpoint


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint as read: where from, the SHA-256 of its bytes (what export and evaluation record), and its
    content (the dict, on the CPU)."""

    uri: str
    sha256: str
    content: dict[str, Any]


def read_checkpoint(uri: str, storage_cfg: Any = None, *, key: str = "checkpoint",
                    require: tuple[str, ...] = BUILD_KEYS, expected_sha256: str | None = None) -> CheckpointFile:
    """Read and check the checkpoint at `uri` through clip.storage: the bytes against `expected_sha256` when given
    (its sidecar's), the content against its own `content_sha256`, and the `require`d keys (default: what
    building the model needs; the train stage's resume passes its own). One-line errors name `uri` (and the
    config `key` that pointed at it): MissingInputError when absent, FormatError when damaged or not a
    checkpoint. A storage error other than "not found" propagates."""
    from clip import storage
    from clip.formats.errors import MissingInputError

    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise MissingInputError(f"checkpoint {uri} does not exist ({key})") from None
    sha256 = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise FormatError(f"{uri} does not match its metadata sidecar {meta_name(storage.basename(uri))} (sha256 "
                          f"{sha256[:12]}... != {expected_sha256[:12]}...): it changed after it was written; move "
                          "both away to use the checkpoint before it")
    try:
        content = parse_checkpoint(raw, uri, require=require)
    except (FormatError, MemoryError):
        raise
    except Exception as exc:  # torch.load's unpickling errors: not a checkpoint at all
        raise FormatError(f"{uri}: not a readable checkpoint ({type(exc).__name__})") from None
    return CheckpointFile(uri, sha256, content)
