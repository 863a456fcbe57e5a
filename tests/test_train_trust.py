"""Training trust: a continued run keeps learning, a resume never re-maps the data silently, storage errors on
checkpoints propagate, and a shard that cannot be read stops the run (fail closed).

Real shards, the real tiny model, real checkpoints on disk (tests/test_train.py's setup).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clip import storage as storage_lib
from clip.config import PipelineConfig, load_config
from clip.train import stage
from tests.support.shards import make_shards
from tests.support.train_config import tiny_overrides


def _cfg(data: Path, out: Path, **extra: object) -> PipelineConfig:
    return load_config(None, tiny_overrides(str(data), str(out), **extra))


def train(cfg: PipelineConfig) -> stage.TrainResult:
    return stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, debug=cfg.debug)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# 1. a finished run continued with more epochs keeps training


def test_finished_run_continued_with_more_epochs_keeps_learning(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=128, per_shard=64)  # 8 steps per epoch
    out = tmp_path / "out"
    first = train(_cfg(tmp_path / "shards", out, **{"train.epochs": 1}))
    assert first.metrics["steps"] == 8
    first_final = _load(out / "final.pt")
    second = train(_cfg(tmp_path / "shards", out, **{"train.epochs": 2, "train.keep_checkpoints": 10}))
    assert second.metrics["resumed_from_step"] == 8 and second.metrics["steps"] == 16
    # the step checkpoint written after the resume: the learning rate in use there is > 0, the schedule's
    # length is the new run's
    mid = _load(out / "step-00000012.pt")
    assert mid["scheduler"]["_last_lr"][0] > 0
    assert mid["scheduler"]["last_epoch"] == 12
    final = _load(out / "final.pt")
    changed = [name for name in final["model"]
               if not torch.equal(final["model"][name], first_final["model"][name])]
    assert changed, "the continued run did not change the weights"


# 2b. the default stream count depends on the batch size alone: a restart with more loader workers (or on fewer
# nodes) reads the same streams and resumes exactly


def _keys_by_step(log: Path) -> dict[int, list[str]]:
    import json

    steps: dict[int, list[str]] = {}
    for line in Path(f"{log}.rank0").read_text().splitlines():
        record = json.loads(line)
        if "step" in record:
            steps.setdefault(record["step"], []).extend(record["keys"])
    return steps


def test_default_stream_count_ignores_world_size_and_workers() -> None:
    from clip.train.schedule import plan_schedule

    counts = {plan_schedule(load_config(None, [f"train.num_workers={w}", "train.batch_size=64"]).train, 4096,
                            world_size=ws).num_streams for ws in (1, 2, 4, 8) for w in (0, 1, 2, 6)}
    assert counts == {8}


def test_restart_with_more_loader_workers_resumes_exactly(tmp_path: Path) -> None:
    from clip.train.step import NonFiniteLossError

    make_shards(tmp_path / "shards", n=160, per_shard=40)  # batch 16: 10 steps per epoch
    extra = {"train.epochs": 2, "train.checkpoint_every": 5, "train.max_nonfinite_steps": 1}
    train(_cfg(tmp_path / "shards", tmp_path / "ref", **extra,
               **{"train.num_workers": 2, "debug.keys_log": str(tmp_path / "ref.log")}))
    # the same run on 0 loader workers stops at step 13; it is restarted with 2 workers
    with pytest.raises(NonFiniteLossError):
        train(_cfg(tmp_path / "shards", tmp_path / "run", **extra,
                   **{"train.num_workers": 0, "debug.fault_nonfinite_steps": [13]}))
    resumed = train(_cfg(tmp_path / "shards", tmp_path / "run", **extra,
                         **{"train.num_workers": 2, "debug.keys_log": str(tmp_path / "run.log")}))
    assert resumed.metrics["resumed_from_step"] == 10 and resumed.metrics["steps"] == 20
    reference, after = _keys_by_step(tmp_path / "ref.log"), _keys_by_step(tmp_path / "run.log")
    assert after == {s: reference[s] for s in range(11, 21)}
    # the loss curve (dvc plots) is one curve across the restart: every log window once, in order
    lines = (tmp_path / "run" / "loss_curve.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,logit_scale,samples_per_s"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(2, 21, 2))


# 2. a resume that would re-map the saved data positions is refused


@pytest.mark.parametrize(("key", "new"), [("seed", 7), ("shuffle_buffer", 16), ("batch_size", 32)])
def test_resume_with_changed_data_mapping_key_is_refused(tmp_path: Path, key: str, new: int) -> None:
    make_shards(tmp_path / "shards", n=128, per_shard=64)
    out = tmp_path / "out"
    cfg = _cfg(tmp_path / "shards", out, **{"train.epochs": 1})
    train(cfg)
    old = getattr(cfg.train, key)
    with pytest.raises(ValueError) as caught:
        train(_cfg(tmp_path / "shards", out, **{"train.epochs": 2, f"train.{key}": new}))
    message = str(caught.value)
    assert "\n" not in message
    assert f"train.{key}" in message and repr(old) in message and repr(new) in message


# 3. a storage error while loading a checkpoint propagates


def test_storage_error_on_newest_checkpoint_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_shards(tmp_path / "shards", n=128, per_shard=64)
    out = tmp_path / "out"
    train(_cfg(tmp_path / "shards", out, **{"train.epochs": 1}))
    real_read = storage_lib.read_bytes

    def failing_read(uri: str, cfg: object = None) -> bytes:
        if str(uri).endswith(storage_lib.basename(str(out / "final.pt"))) and str(out) in str(uri):
            raise storage_lib.StorageError(f"reading {uri} failed: simulated outage")
        return real_read(uri, cfg)

    monkeypatch.setattr(storage_lib, "read_bytes", failing_read)
    with pytest.raises(storage_lib.StorageError, match="simulated outage"):
        train(_cfg(tmp_path / "shards", out, **{"train.epochs": 2}))


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=128, per_shard=64)
    out = tmp_path / "out"
    train(_cfg(tmp_path / "shards", out, **{"train.epochs": 1, "train.keep_checkpoints": 10}))
    (out / "final.pt").write_bytes(b"not a checkpoint at all")
    from clip.train.checkpoint import latest_checkpoint

    with pytest.warns(UserWarning, match="final.pt"):
        found = latest_checkpoint(str(out))
    assert found is not None and found[0].endswith("step-00000004.pt")


# 4. reads fail closed


def test_missing_shard_stops_the_run_naming_it(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=128, per_shard=32)
    victim = tmp_path / "shards" / "shard-00002.tar"
    victim.unlink()
    with pytest.raises(Exception, match="shard-00002") as caught:
        train(_cfg(tmp_path / "shards", tmp_path / "out", **{"train.epochs": 1}))
    assert not (tmp_path / "out" / "final.pt").exists()
    assert isinstance(caught.value, (RuntimeError, OSError))
