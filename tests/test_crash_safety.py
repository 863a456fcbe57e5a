"""Crash safety (issue 21 items 3, 6, 7, 11a): a killed export keeps the served bundle, a damaged checkpoint
without its sidecar is passed over, one shard run per output, and a killed write leaves no temp file behind.

Real processes killed with SIGKILL, real exports (ONNX + parity gate), real tiny training runs, moto on loopback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from clip import storage
from clip.config import ComputeConfig, ExportConfig, StorageConfig, load_config
from clip.export import stage as export_stage
from clip.export.publish import FAULT_KILL_ENV, publish_bundle
from clip.formats.bundle import VERSIONS_DIR, bundle_file_uri, verify_bundle, write_bundle
from clip.formats.checkpoint import FINAL_NAME, meta_name
from clip.runtime import Bundle
from clip.shards import stage as shard_stage
from clip.storage.lock import LOCK_NAME, LockHeld, output_lock
from clip.tokenizer import Tokenizer
from clip.train import stage as train_stage
from tests.support.shards import make_shards, write_keep, write_unique_pool
from tests.support.train_config import tiny_overrides
from tests.test_export import CAPTIONS, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A real Python process (the environment now, so AWS_ENDPOINT_URL set by a fixture is seen)."""
    full_env = {key: value for key, value in os.environ.items() if key != "CLIP_PIPELINE_DEBUG"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**full_env, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=300, check=False)


# ---------------------------------------------------------------------------------------------------------
# item 3: a crash during export leaves the served bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], dict]:
    """A real export (tiny-vit, parity gate passed): its checkpoint and the bundle's contents and info, which
    the tests publish again (quick) around the export processes they kill."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = write_checkpoint(root / "run" / FINAL_NAME, "tiny-vit", Tokenizer.train(CAPTIONS, vocab_size=600))
    cfg = ExportConfig(checkpoint=str(checkpoint), output_dir=str(root / "bundle"))
    export_stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig())
    contents: dict[str, bytes] = {}
    info = verify_bundle(str(root / "bundle"), on_file=contents.__setitem__).info
    return checkpoint, contents, info


def _assert_serves(output: str, label: str) -> None:
    info = verify_bundle(output).info
    assert info["label"] == label
    assert Bundle.load(output).encode_texts(["a red circle"]).shape == (1, info["embed_dim"])


def test_export_killed_mid_publish_keeps_the_old_bundle(tmp_path: Path, exported: tuple) -> None:
    """The old code removed the manifest first and rewrote files in place: a kill there left no bundle."""
    checkpoint, contents, info = exported
    bundle = str(tmp_path / "models" / "bundle")
    first = publish_bundle(bundle, contents, {**info, "label": "old"})
    proc = _python(["-m", "pipelines.export", "--set", f"export.checkpoint={checkpoint}",
                    "--set", f"export.output_dir={bundle}", "--set", "tracking.enabled=false"], tmp_path,
                   **{FAULT_KILL_ENV: "2"})  # a real export, SIGKILLed after writing 2 files of its new version
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    _assert_serves(bundle, "old")
    versions = tmp_path / "models" / "bundle" / VERSIONS_DIR
    assert len(list(versions.iterdir())) == 2  # the served one and the unfinished one
    second = publish_bundle(bundle, contents, {**info, "label": "new"})  # takes over the dead run's lock
    _assert_serves(bundle, "new")
    # the unfinished folder is gone; the one replaced is kept for readers that resolved it just before
    assert {p.name for p in versions.iterdir()} == {first.version, second.version}
    assert not (tmp_path / "models" / "bundle" / LOCK_NAME).exists()


def test_publish_killed_on_s3_keeps_the_old_bundle(tmp_path: Path, s3_bucket: str, exported: tuple) -> None:
    _checkpoint, contents, info = exported
    bundle = f"s3://{s3_bucket}/models/bundle"
    first = publish_bundle(bundle, contents, {**info, "label": "old"})
    (tmp_path / "contents").mkdir()
    for name, data in contents.items():
        (tmp_path / "contents" / name).write_bytes(data)
    (tmp_path / "info.json").write_text(json.dumps({**info, "label": "new"}))
    script = ("import json, pathlib, sys\nfrom clip.export.publish import publish_bundle\n"
              "contents = {p.name: p.read_bytes() for p in pathlib.Path('contents').iterdir()}\n"
              "publish_bundle(sys.argv[1], contents, json.loads(pathlib.Path('info.json').read_text()))")
    proc = _python(["-c", script, bundle], tmp_path, **{FAULT_KILL_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    _assert_serves(bundle, "old")
    second = publish_bundle(bundle, contents, {**info, "label": "new"})  # the dead run's lock (pid gone) is broken
    _assert_serves(bundle, "new")
    versions = f"{bundle}/{VERSIONS_DIR}/"
    assert {o.uri[len(versions):].split("/")[0] for o in storage.list_objects(versions)} == {first.version,
                                                                                             second.version}
    assert not storage.exists(f"{bundle}/{LOCK_NAME}")


def test_flat_bundle_is_replaced_by_a_published_one(tmp_path: Path, exported: tuple) -> None:
    """A bundle in the layout before versions (files beside the manifest) is served until the switch."""
    _checkpoint, contents, info = exported
    bundle = tmp_path / "bundle"
    write_bundle(str(bundle), contents, {**info, "label": "flat"})
    _assert_serves(str(bundle), "flat")
    publish_bundle(str(bundle), contents, {**info, "label": "new"})
    _assert_serves(str(bundle), "new")
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", VERSIONS_DIR]
    assert Path(bundle_file_uri(str(bundle), "model_card.md")).read_bytes() == contents["model_card.md"]


# ---------------------------------------------------------------------------------------------------------
# item 6: a damaged checkpoint without its sidecar is not used


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's bytes (torch's zip keeps them stored, uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _train(data: Path, out: Path, **extra: object) -> train_stage.TrainResult:
    cfg = load_config(None, tiny_overrides(str(data), str(out), **extra))
    return train_stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                           debug=cfg.debug)


def test_damaged_checkpoint_without_sidecar_is_passed_over_loudly(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=128, per_shard=64)  # 8 steps per epoch, a checkpoint every 4
    out = tmp_path / "out"
    _train(tmp_path / "shards", out, **{"train.keep_checkpoints": 10})
    final = out / FINAL_NAME
    good = torch.load(final, weights_only=True)
    (out / meta_name(FINAL_NAME)).unlink()
    _flip_tensor_byte(final)
    damaged = torch.load(final, weights_only=True)  # torch.load does not notice ...
    assert any(not torch.equal(damaged["model"][k], good["model"][k]) for k in good["model"])  # ... the change
    with pytest.warns(UserWarning, match=f"passed over: {final}; using {out / 'step-00000004.pt'}"):
        resumed = _train(tmp_path / "shards", out, **{"train.epochs": 2, "train.keep_checkpoints": 10})
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["steps"] == 16


# ---------------------------------------------------------------------------------------------------------
# item 7: one shard run per output


@pytest.fixture
def shard_inputs(tmp_path: Path) -> dict[str, str]:
    samples = write_unique_pool(tmp_path / "raw", 12, 6, seed=2)
    write_keep(tmp_path / "dedup", {key: f"raw-{i // 6:05d}.tar" for i, key in enumerate(sorted(samples))}, samples)
    return {"shard.input_dir": str(tmp_path / "raw"), "shard.dedup_dir": str(tmp_path / "dedup"),
            "shard.output": str(tmp_path / "shards"), "shard.staging_dir": str(tmp_path / "staging")}


def _shard_in_process(overrides: dict[str, str]) -> shard_stage.ShardResult:
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    return shard_stage.run(cfg.shard, storage=cfg.storage, compute=cfg.compute)


def test_second_shard_run_on_one_output_is_refused_naming_the_holder(tmp_path: Path,
                                                                     shard_inputs: dict[str, str]) -> None:
    args = ["-m", "pipelines.shard"] + [a for k, v in shard_inputs.items() for a in ("--set", f"{k}={v}")]
    with output_lock(shard_inputs["shard.output"], "the first shard run"):
        proc = _python(args, tmp_path)
        assert not (tmp_path / "shards" / "latest.json").exists()
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "is in use by the first shard run (pid " + str(os.getpid()) in errors[0], errors[0]
    assert _shard_in_process(shard_inputs).metrics["total_samples"] == 12  # the holder is done: it runs
    assert not (tmp_path / "shards" / LOCK_NAME).exists()


def test_lock_of_a_killed_shard_run_is_taken_over(tmp_path: Path, shard_inputs: dict[str, str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    output = shard_inputs["shard.output"]
    holder = _python(["-c", "import os, signal, sys\nfrom clip.storage.lock import output_lock\n"
                            "held = output_lock(sys.argv[1], 'shard')\nheld.__enter__()\nos.kill(os.getpid(), signal.SIGKILL)",
                      output], tmp_path)
    assert holder.returncode == -signal.SIGKILL, holder.stderr
    left = json.loads((Path(output) / LOCK_NAME).read_text())
    with caplog.at_level(logging.WARNING, logger="clip.storage"):
        assert _shard_in_process(shard_inputs).metrics["total_samples"] == 12
    assert f"taking over the lock left by shard (pid {left['pid']} on" in caplog.text
    assert not (Path(output) / LOCK_NAME).exists()


def test_s3_lock_refuses_a_live_holder_and_breaks_a_stale_one(s3_bucket: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    output = f"s3://{s3_bucket}/data/shards"
    with output_lock(output, "shard"):
        with pytest.raises(LockHeld, match=rf"{output} is in use by shard \(pid {os.getpid()} on"):
            with output_lock(output, "shard"):
                pass
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    records = {"dead pid on this host": {"pid": int(dead.stdout), "host": socket.gethostname(),
                                         "started": time.time()},
               "older than the limit": {"pid": 1, "host": "elsewhere", "started": time.time() - 2 * 24 * 3600}}
    for why, record in records.items():
        client.put_object(Bucket=s3_bucket, Key="data/shards/.lock", Body=json.dumps({"purpose": "x", **record}))
        with caplog.at_level(logging.WARNING, logger="clip.storage"):
            with output_lock(output, "shard"):
                pass
        assert "breaking the lock of x" in caplog.text, why
        caplog.clear()
    client.put_object(Bucket=s3_bucket, Key="data/shards/.lock",
                      Body=json.dumps({"purpose": "x", "pid": 1, "host": "elsewhere", "started": time.time()}))
    with pytest.raises(LockHeld, match="in use by x .pid 1 on elsewhere"):
        with output_lock(output, "shard"):
            pass


# ---------------------------------------------------------------------------------------------------------
# item 11a: temp files of an interrupted checkpoint write are removed at training start


def test_stale_checkpoint_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=64, per_shard=64)
    out = tmp_path / "out"
    out.mkdir()
    ours = [out / ".step-00000004.pt.tmp-0123456789ab", out / ".final.meta.json.tmp-abcdef012345"]
    others = [out / "notes.tmp-0123456789ab", out / ".final.pt.tmp-short", out / "sub"]
    for path in ours + others[:2]:
        path.write_bytes(b"partial")
    others[2].mkdir()
    (others[2] / ".final.pt.tmp-0123456789ab").write_bytes(b"not in the run folder itself")
    _train(tmp_path / "shards", out)
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in others) and (others[2] / ".final.pt.tmp-0123456789ab").exists()


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A process killed inside `storage.write_stream` leaves its temporary file; `storage.remove_leftovers` (what
    collect runs first) deletes exactly such files of the folder itself, not other dot files or sub-folders'."""
    out = tmp_path / "raw"
    script = ("import os, signal, sys; from clip import storage\n"
              "def fill(handle):\n"
              "    handle.write(b'half a shard'); handle.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              "storage.write_stream(sys.argv[1], fill)\n")
    done = subprocess.run([sys.executable, "-c", script, str(out / "raw-00000.tar")], cwd=REPO)
    assert done.returncode == -signal.SIGKILL
    leftover = [p.name for p in out.iterdir()]
    assert len(leftover) == 1 and leftover[0].startswith(".raw-00000.tar.tmp-")
    others = [out / ".keep", out / "notes.tmp-0123456789ab", out / ".raw-00001.tar.tmp-short", out / "records"]
    for path in others[:3]:
        path.write_bytes(b"not a write of ours")
    others[3].mkdir()
    (others[3] / ".raw-00000.json.tmp-0123456789ab").write_bytes(b"in a sub-folder")
    assert storage.remove_leftovers(str(out)) == leftover
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in others)
    assert (others[3] / ".raw-00000.json.tmp-0123456789ab").exists()
    assert storage.remove_leftovers(str(out)) == [] and storage.remove_leftovers("s3://bucket/raw") == []
