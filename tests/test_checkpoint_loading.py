"""From a checkpoint reference to (model, tokenizer), one way: clip.formats.checkpoint `resolve_checkpoint` (the same
rule on local folders and on S3, a real moto server on 127.0.0.1), `read_checkpoint`, and clip.model
`build_from_checkpoint` (strict weights, a tokenizer that fits), as export and evaluation use them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from clip import storage
from clip.eval.encoders import CheckpointEncoder
from clip.export import stage as export_stage
from clip.formats.checkpoint import (
    AmbiguousCheckpointError,
    TrainedRun,
    checkpoint_bytes,
    choose_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    step_name,
)
from clip.formats.errors import FormatError, MissingInputError
from clip.model import CheckpointMismatchError, build_from_checkpoint, create_model
from clip.model.model import LOGIT_SCALE_MAX
from clip.tokenizer import Tokenizer

CAPTIONS = [f"a photo of {n} {c} {s}" for n in ("one", "two") for c in ("red", "blue") for s in ("cat", "dog", "car")]

# (path in the tree, whose rule picks what): the same contents go to a local folder and to an S3 prefix.
TREE = [
    "file/weights.pt",
    "finished/final.pt", f"finished/{step_name(30)}", f"finished/{step_name(200)}",  # final.pt over any step
    f"unfinished/{step_name(9)}", f"unfinished/{step_name(120)}", f"unfinished/{step_name(40)}",  # by step number
    "unfinished/notes.txt",
    f"one-run/run-a/{step_name(5)}", "one-run/run-a/final.pt", "one-run/run-a/tokenizer.json",  # a folder of one run
    "one-run/logs/train.log",  # a folder without checkpoints is not a run
    "two-runs/run-a/final.pt", f"two-runs/run-b/{step_name(7)}",
    "deep/x/y/final.pt",  # two levels down: not a run of `deep`
]
EXPECTED = {
    "file/weights.pt": "file/weights.pt",
    "finished": "finished/final.pt",
    "finished/": "finished/final.pt",
    "unfinished": f"unfinished/{step_name(120)}",
    "one-run": "one-run/run-a/final.pt",
    "one-run/run-a": "one-run/run-a/final.pt",
}


def _put(root: str, order: list[str]) -> None:
    for name in order:
        storage.write_bytes(storage.join(root, name), b"x")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CAPTIONS * 4, vocab_size=600, min_frequency=1)


def _checkpoint(fitting: Tokenizer, **changes: object) -> dict:
    """A tiny-vit checkpoint's content whose model fits the tokenizer `fitting` (`changes` replace keys)."""
    torch.manual_seed(0)
    model = create_model("tiny-vit", vocab_size=fitting.vocab_size)
    return {"model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": fitting.to_json(),
            "data_version": "d" * 64, **changes}


def test_local_and_s3_resolve_the_same_folder_contents_alike(tmp_path: Path, s3_bucket: str) -> None:
    local, remote = str(tmp_path / "models"), f"s3://{s3_bucket}/models"
    _put(local, list(reversed(TREE)))  # written in another order: a file's age never decides
    _put(remote, TREE)
    os.utime(tmp_path / "models" / "unfinished" / step_name(9), (2e9, 2e9))  # the newest file locally: ignored
    for root in (local, remote):
        for reference, expected in EXPECTED.items():
            assert resolve_checkpoint(storage.join(root, reference), key="k") == storage.join(root, expected), root
        # the run of a data version: its final.pt only (a run killed part-way is resumed, never exported)
        with pytest.raises(MissingInputError, match="no finished training run for data version aaaaaaaaaaaa: no "
                                                     f"final.pt in {storage.join(root, 'unfinished')} "):
            resolve_checkpoint(TrainedRun(storage.join(root, "unfinished"), "a" * 64))
        assert resolve_checkpoint(TrainedRun(storage.join(root, "finished"), "c" * 64)) == storage.join(
            root, "finished", "final.pt")
        for reference in ("deep", "nowhere", "one-run/logs"):
            with pytest.raises(MissingInputError, match=f"no checkpoint in {storage.join(root, reference)} \\(k\\)"):
                resolve_checkpoint(storage.join(root, reference), key="k")
        with pytest.raises(MissingInputError, match=f"checkpoint {root}/missing.pt does not exist \\(k\\)"):
            resolve_checkpoint(storage.join(root, "missing.pt"), key="k")
        with pytest.raises(MissingInputError, match="no finished training run for data version bbbbbbbbbbbb: "):
            resolve_checkpoint(TrainedRun(storage.join(root, "one-run"), "b" * 64))


def test_a_folder_of_two_runs_is_refused_in_one_line_naming_both(tmp_path: Path, s3_bucket: str) -> None:
    local, remote = str(tmp_path / "models"), f"s3://{s3_bucket}/models"
    for root in (local, remote):
        _put(root, TREE)
        with pytest.raises(AmbiguousCheckpointError) as err:
            resolve_checkpoint(storage.join(root, "two-runs"), key="evaluate.checkpoint")
        message = str(err.value)
        assert "\n" not in message
        assert message == (f"{root}/two-runs (evaluate.checkpoint) holds 2 training runs (run-a, run-b): name the "
                           "run folder or its checkpoint file")


def test_choose_checkpoint_reads_names_only() -> None:
    assert choose_checkpoint([step_name(99), "final.pt", step_name(100)]) == "final.pt"
    assert choose_checkpoint([step_name(99), step_name(100), step_name(8)]) == step_name(100)
    assert choose_checkpoint(["tokenizer.json", "step-1.pt", "metrics.json"]) is None


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_naming_the_file(tmp_path: Path,
                                                                           tokenizer: Tokenizer) -> None:
    bigger = Tokenizer.train(CAPTIONS * 4 + ["zebra quagga okapi narwhal"] * 4, vocab_size=700, min_frequency=1)
    assert bigger.vocab_size > tokenizer.vocab_size
    path = tmp_path / "run" / "final.pt"
    path.parent.mkdir()
    path.write_bytes(checkpoint_bytes(_checkpoint(tokenizer, tokenizer=bigger.to_json())))
    fits = f"{path}: its tokenizer \\(vocab {bigger.vocab_size}, context 77\\) does not fit its model \\(vocab "
    with pytest.raises(CheckpointMismatchError, match=fits) as err:
        CheckpointEncoder.load(str(path.parent))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointMismatchError, match=fits):
        export_stage.load_for_export(str(path), None)
    short = Tokenizer.train(CAPTIONS * 4, vocab_size=600, min_frequency=1, context_length=16)  # another context
    with pytest.raises(CheckpointMismatchError,
                       match=f"context 16\\) does not fit its model \\(vocab {tokenizer.vocab_size}, context 77"):
        build_from_checkpoint(_checkpoint(tokenizer, tokenizer=short.to_json()), str(path))


def test_state_dict_key_mismatch_is_refused_naming_the_file(tmp_path: Path, tokenizer: Tokenizer) -> None:
    checkpoint = _checkpoint(tokenizer)
    del checkpoint["model"]["ln_final.weight"]
    path = tmp_path / "final.pt"
    path.write_bytes(checkpoint_bytes(checkpoint))
    with pytest.raises(CheckpointMismatchError, match=f"{path}: weights disagree with its model_config \\(tiny-vit\\)"
                                                      ": state dict does not match the model: missing \\(1\\): "
                                                      "ln_final.weight$"):
        CheckpointEncoder.load(str(path))
    extra = _checkpoint(tokenizer)
    extra["model"]["visual.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="unexpected \\(1\\): visual.extra"):
        build_from_checkpoint(extra, "s3://bucket/run/final.pt")
    with pytest.raises(CheckpointMismatchError, match="^s3://b/x.pt: checkpoint lacks key\\(s\\) \\['tokenizer'\\]"):
        build_from_checkpoint({k: v for k, v in _checkpoint(tokenizer).items() if k != "tokenizer"}, "s3://b/x.pt")


def test_read_checkpoint_checks_bytes_and_names_the_file(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "final.pt"
    path.write_bytes(checkpoint_bytes(_checkpoint(tokenizer)))
    read = read_checkpoint(str(path))
    model, built_tokenizer = build_from_checkpoint(read.content, read.uri)
    assert built_tokenizer.to_json() == tokenizer.to_json() and not model.training
    with pytest.raises(FormatError, match="final.pt does not match its metadata sidecar final.meta.json"):
        read_checkpoint(str(path), expected_sha256="0" * 64)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match=f"^{path}: not a readable checkpoint"):
        read_checkpoint(str(path))


def test_every_reader_of_the_scale_gets_the_clamped_one(tmp_path: Path, tokenizer: Tokenizer) -> None:
    checkpoint = _checkpoint(tokenizer)
    checkpoint["model"]["logit_scale"] = torch.tensor(math.log(500.0))  # beyond the maximum: clamped on reading
    path = tmp_path / "final.pt"
    path.write_bytes(checkpoint_bytes(checkpoint))
    assert CheckpointEncoder.load(str(path)).logit_scale == pytest.approx(LOGIT_SCALE_MAX)
    info = export_stage.bundle_info(export_stage.load_for_export(str(path), None), parity={})
    assert info["logit_scale"] == pytest.approx(LOGIT_SCALE_MAX)
