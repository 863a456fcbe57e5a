"""Training stage, single process: tar reading, the deterministic stream, learning, MLflow, resume, corrupt data.

Real shards (tar files written with `tarfile`), the real tiny model, real checkpoints on disk; no mocks.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clip.config import ComputeConfig, ConfigError, PipelineConfig, load_config
from clip.formats.tar import iter_tar_samples
from clip.train import stage
from clip.train.distributed import first_slurm_host, slurm_env, under_launcher
from clip.train.schedule import WarmupCosine, default_streams, plan_schedule
from clip.train.step import NonFiniteLossError
from clip.train.streams import RawStream, StreamPlan, StreamStats, open_uri, read_manifest, shuffled_stream
from tests.support.shards import make_samples, make_shards, write_manifest, write_tar
from tests.support.train_config import tiny_overrides


def _cfg(data: Path, out: Path, **extra: object) -> PipelineConfig:
    return load_config(None, tiny_overrides(str(data), str(out), **extra))


def train(cfg: PipelineConfig) -> stage.TrainResult:
    """The library call (what every rank runs), given the config's sections."""
    return stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, debug=cfg.debug)


def _keys_by_step(log_base: Path, ranks: int = 1) -> dict[int, list[str]]:
    """step -> global batch keys (ranks' parts concatenated in rank order), last record wins per step."""
    steps: dict[int, list[str]] = {}
    for rank in range(ranks):
        per_rank: dict[int, list[str]] = {}
        for line in Path(f"{log_base}.rank{rank}").read_text().splitlines():
            record = json.loads(line)
            if "step" in record:
                per_rank[record["step"]] = record["keys"]
        for step, keys in per_rank.items():
            steps.setdefault(step, []).extend(keys)
    return steps


# ---------------------------------------------------------------------------------------------------------
# tar reading and the stream


def test_tar_reader_matches_tarfile_including_long_names(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    long_key = "sub/" + "k" * 150  # needs a pax header (name > 100 bytes)
    members = [("000000001.jpg", b"x" * 700), ("000000001.txt", b"one"), (f"{long_key}.jpg", b"y" * 513),
               (f"{long_key}.txt", b"two"), ("000000003.txt", b"")]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f))
    assert [k for k, _ in samples] == ["000000001", long_key, "000000003"]
    assert samples[0][1] == {"jpg": b"x" * 700, "txt": b"one"}
    assert samples[1][1] == {"jpg": b"y" * 513, "txt": b"two"}
    assert samples[2][1] == {"txt": b""}


def test_truncated_shard_yields_complete_samples_and_is_counted(tmp_path: Path) -> None:
    samples = make_samples(10)
    write_tar(tmp_path / "shard-00000.tar", samples)
    data = (tmp_path / "shard-00000.tar").read_bytes()
    # cut inside sample 6's jpg: samples 0-5 are whole
    with tarfile.open(tmp_path / "shard-00000.tar") as tar:
        offset = next(m.offset_data for m in tar.getmembers() if m.name == "000000006.jpg")
    (tmp_path / "shard-00000.tar").write_bytes(data[: offset + 10])
    write_manifest(tmp_path, ["shard-00000.tar"], [10])
    manifest = read_manifest(str(tmp_path))
    stats = StreamStats()
    plan = StreamPlan(manifest.shards, num_streams=1, seed=0)
    raw = iter(RawStream(plan, 0, 0, open_uri, stats))
    keys = [next(raw)[1] for _ in range(13)]  # the range wraps to a new pass after 6 samples
    assert keys == [f"{i:09d}" for i in range(6)] * 2 + ["000000000"]
    assert stats.truncated_shards == 2


def test_sequential_epoch_covers_every_sample_once_and_resumes_at_any_position(tmp_path: Path) -> None:
    all_keys = make_shards(tmp_path, n=100, per_shard=30)  # shards of 30, 30, 30, 10
    manifest = read_manifest(str(tmp_path))
    plan = StreamPlan(manifest.shards, num_streams=3, seed=7)
    seen: list[str] = []
    streams: dict[int, list[str]] = {}
    for s in range(3):
        length = plan.stream_length(s)
        it = shuffled_stream(RawStream(plan, 0, s, open_uri, StreamStats()), window=8, start=0)
        streams[s] = [next(it)[1] for _ in range(length)]
        seen += streams[s]
    assert sorted(seen) == sorted(all_keys)  # one epoch = every sample exactly once
    assert [plan.stream_length(s) for s in range(3)] == [33, 33, 34]
    for s, start in ((0, 5), (1, 17), (2, 33)):
        it = shuffled_stream(RawStream(plan, 0, s, open_uri, StreamStats()), window=8, start=start)
        assert [next(it)[1] for _ in range(plan.stream_length(s) - start)] == streams[s][start:]
    # another epoch: another order of the same samples
    it = shuffled_stream(RawStream(plan, 1, 0, open_uri, StreamStats()), window=8, start=0)
    assert [next(it)[1] for _ in range(33)] != streams[0]


def test_schedule_and_lr_rules() -> None:
    cfg = load_config(None, ["train.batch_size=64", "train.num_workers=2", "train.epochs=4"])
    schedule = plan_schedule(cfg.train, 4096, world_size=1)
    assert (schedule.num_streams, schedule.chunk, schedule.steps_per_epoch, schedule.total_steps) == (8, 8, 64, 256)
    with pytest.raises(ValueError, match="multiple of the world size"):
        plan_schedule(cfg.train, 4096, world_size=3)
    assert [default_streams(b) for b in (1, 16, 64, 100, 512, 32768)] == [1, 2, 8, 10, 64, 4096]
    bad = load_config(None, ["train.batch_size=60", "train.streams=8"])
    with pytest.raises(ValueError, match="train.batch_size \\(60\\).*data streams"):
        plan_schedule(bad.train, 4096, world_size=1)
    lr = WarmupCosine(warmup=10, total=110)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.5) and lr(110) == pytest.approx(0.0, abs=1e-12)


def test_newest_checkpoint_is_chosen_by_step_not_by_name(tmp_path: Path) -> None:
    from clip.train.checkpoint import latest_checkpoint, save_checkpoint, step_name

    out = str(tmp_path / "out")
    assert latest_checkpoint(out) is None
    for step in (4, 8):
        save_checkpoint(f"{out}/{step_name(step)}", {"step": step})
    save_checkpoint(f"{out}/final.pt", {"step": 8})
    assert latest_checkpoint(out)[0].endswith("final.pt")  # a tie: the finished run's final.pt
    # the finished run continued with more epochs, then stopped: its step checkpoints are newer than final.pt
    save_checkpoint(f"{out}/{step_name(12)}", {"step": 12})
    (tmp_path / "out" / step_name(16)).write_bytes(b"not a checkpoint")  # unreadable: skipped
    uri, ckpt = latest_checkpoint(out)
    assert uri.endswith(step_name(12)) and ckpt["step"] == 12


def test_unknown_model_is_refused_before_any_work(tmp_path: Path) -> None:
    from clip.model import ModelConfigError
    make_shards(tmp_path / "shards", n=32, per_shard=32)
    with pytest.raises(ModelConfigError, match="unknown model config 'ViT-Z-99'; known: .*tiny-vit"):
        train(_cfg(tmp_path / "shards", tmp_path / "out", **{"train.model": "ViT-Z-99"}))
    assert not (tmp_path / "out").exists()  # no tokenizer trained, nothing written


def test_resume_with_another_model_is_refused(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=32, per_shard=32)
    assert train(_cfg(tmp_path / "shards", tmp_path / "out")).steps == 2
    with pytest.raises(ValueError, match=r"final.pt was trained with train.model='tiny-vit' but this run asks for 'tiny-rn'"):
        train(_cfg(tmp_path / "shards", tmp_path / "out", **{"train.model": "tiny-rn"}))


def test_wrap_model_puts_resnet_convolutions_in_channels_last() -> None:
    from clip.model import create_model
    from clip.train.distributed import DistInfo
    from clip.train.wrap import wrap_model

    def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]

    plain = wrap_model(create_model("tiny-rn"), DistInfo())  # CPU default: layout untouched
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(plain.module))
    nhwc = wrap_model(create_model("tiny-rn"), DistInfo(), channels_last=True)  # what CUDA gets by default
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(nhwc.module))
    assert nhwc.module.visual.channels_last


def test_slurm_environment_maps_to_torch_variables() -> None:
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    env = slurm_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                     "SLURM_NODELIST": "node[3-4]", "SLURM_JOB_ID": "1234"})
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node3", "MASTER_PORT": "29734"}
    assert slurm_env({}) == {}
    # An sbatch batch script (allocation of 8 tasks, one process, not an srun step) is not rank 0 of 8.
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODELIST": "node[3-4]", "SLURM_JOB_ID": "1"}
    assert slurm_env(batch_script) == {}
    assert not under_launcher(batch_script)
    assert under_launcher({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"})


def test_torchrun_command_single_and_multi_node() -> None:
    from pipelines.train import torchrun_command

    single = torchrun_command("p.yaml", ComputeConfig(nproc_per_node=8))
    assert single[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8", "--max-restarts",
                          "0", "-m", "pipelines.train", "--params", "p.yaml"]
    multi = torchrun_command("p.yaml", ComputeConfig(nproc_per_node=4, nnodes=2, rdzv_endpoint="head:29400",
                                                     max_restarts=2))
    assert "--standalone" not in multi and "--node-rank" not in multi
    assert multi[multi.index("--rdzv-endpoint") + 1] == "head:29400"
    assert multi[multi.index("--nnodes") + 1] == "2" and multi[multi.index("--max-restarts") + 1] == "2"
    pinned = torchrun_command("p.yaml", ComputeConfig(nnodes=2, rdzv_endpoint="head:29400", node_rank=1))
    assert pinned[pinned.index("--node-rank") + 1] == "1"
    with pytest.raises(ValueError, match="compute.rdzv_endpoint"):
        torchrun_command("p.yaml", ComputeConfig(nnodes=2))
    # the launcher options are config keys now: a bad endpoint or restart count is refused when the config loads
    with pytest.raises(ConfigError, match="compute.rdzv_endpoint: must be host:port"):
        load_config(None, ["compute.nnodes=2", "compute.rdzv_endpoint=head"])
    with pytest.raises(ConfigError, match="compute.max_restarts"):
        load_config(None, ["compute.max_restarts=-1"])


def test_workers_get_exactly_the_resolved_config(tmp_path: Path) -> None:
    """torchrun workers load the launcher's resolved config from one params file, not the original --set list."""
    from pipelines.train import is_single_process, write_worker_params

    cfg = load_config(None, tiny_overrides(str(tmp_path / "shards"), str(tmp_path / "out"), **{
        "compute.nproc_per_node": 2, "compute.max_restarts": 1, "debug.fault_step_delay_s": 0.5}))
    assert load_config(write_worker_params(cfg, tmp_path)) == cfg
    assert not is_single_process(cfg.compute) and is_single_process(ComputeConfig())
    assert not is_single_process(ComputeConfig(max_restarts=1))  # restarts need the launcher even for one process


# ---------------------------------------------------------------------------------------------------------
# training


def test_single_process_learns_logs_to_mlflow_and_writes_outputs(tmp_path: Path, mlflow_store: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from clip.progress import RecordingProgress
    from clip.tracking import git_commit
    from pipelines.train import run

    monkeypatch.chdir(tmp_path)  # started outside the checkout: the git_commit tag is still the code's commit

    make_shards(tmp_path / "shards", n=256, per_shard=64)
    out = tmp_path / "out"
    cfg = load_config(None, tiny_overrides(
        str(tmp_path / "shards"), str(out), **{
            "train.epochs": 4, "tracking.enabled": True, "tracking.uri": mlflow_store["uri"],
            "tracking.artifact_location": mlflow_store["artifact_location"], "tracking.experiment": "t"}))
    progress = RecordingProgress()
    result = run(cfg, progress)  # one process: in-process
    metrics = result.metrics
    assert metrics["steps"] == 64 and (out / "final.pt").exists() and (out / "tokenizer.json").exists()
    assert result.outputs["checkpoint"] == result.checkpoint == str(out / "final.pt")
    assert result.outputs["tokenizer"] == result.tokenizer == str(out / "tokenizer.json")
    done, total, detail = progress.last["train"]  # rank 0 reports through the progress protocol
    assert (done, total) == (64, 64) and detail == f"loss {metrics['final_loss']:.3f}"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 64
    ckpt = torch.load(out / "final.pt", weights_only=True)
    assert ckpt["step"] == 64 and ckpt["samples_seen"] == 64 * 16
    assert ckpt["data_version"] == json.loads((tmp_path / "shards" / "manifest.json").read_text())["data_version"]
    from clip.model import create_model_from_config
    from clip.tokenizer import Tokenizer

    model = create_model_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    assert Tokenizer.from_json(ckpt["tokenizer"]).vocab_size == model.config.text.vocab_size
    # only the newest keep_checkpoints (3) step checkpoints remain
    assert sorted(p.name for p in out.glob("step-*.pt")) == ["step-00000052.pt", "step-00000056.pt", "step-00000060.pt"]

    client = MlflowClient(mlflow_store["uri"])
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(history) >= 30
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert first > 2.3 and last < 0.75 * first, (first, last)  # ln(16) = 2.77 at chance
    assert run.data.params["train.batch_size"] == "16"
    assert run.data.tags["data_version"] == ckpt["data_version"]
    assert run.data.tags.get("git_commit") == git_commit(Path(__file__).resolve().parent) is not None
    for name in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_fraction", "peak_memory_mb"):
        assert name in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/final.pt", "checkpoint/tokenizer.json"} <= artifacts


def test_resume_after_a_stop_continues_with_exactly_the_same_samples(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=192, per_shard=50)
    extra = {"train.epochs": 2, "train.num_workers": 2, "train.checkpoint_every": 5, "train.max_nonfinite_steps": 1}
    # uninterrupted reference
    ref = train(_cfg(tmp_path / "shards", tmp_path / "ref", **extra, **{"debug.keys_log": str(tmp_path / "ref.log")}))
    assert ref.metrics["steps"] == 24
    # the same run stopped at step 13 (a non-finite loss with max_nonfinite_steps=1), then started again
    extra["debug.keys_log"] = str(tmp_path / "run.log")
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps"):
        train(_cfg(tmp_path / "shards", tmp_path / "run", **extra, **{"debug.fault_nonfinite_steps": [13]}))
    assert not (tmp_path / "run" / "final.pt").exists()
    assert torch.load(tmp_path / "run" / "step-00000010.pt", weights_only=True)["step"] == 10  # last good, intact
    (tmp_path / "run.log.rank0").rename(tmp_path / "first.log.rank0")
    resumed = train(_cfg(tmp_path / "shards", tmp_path / "run", **extra))
    assert resumed.metrics["resumed_from_step"] == 10 and resumed.metrics["steps"] == 24
    after = _keys_by_step(tmp_path / "run.log")
    reference = _keys_by_step(tmp_path / "ref.log")
    assert sorted(after) == list(range(11, 25))
    assert after == {s: reference[s] for s in range(11, 25)}
    # every sample exactly once per epoch in the reference (8 steps x 16 = 128 of 192 would be wrong: 12 steps)
    assert len({k for s in range(1, 13) for k in reference[s]}) == 192
    # and the trained weights are the same as the uninterrupted run's
    a = torch.load(tmp_path / "ref" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "final.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=64, per_shard=64)
    metrics = train(_cfg(tmp_path / "shards", tmp_path / "out", **{"train.epochs": 1,
                                                                   "debug.fault_nonfinite_steps": [2, 3]})).metrics
    assert metrics["steps"] == 4 and metrics["nonfinite_steps"] == 2 and math.isfinite(metrics["final_loss"])


def test_corrupt_and_truncated_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = make_samples(64)
    bad_jpeg = ("000000003", b"\xff\xd8\xff\xe0 not really a jpeg", samples[3][2])
    samples[3] = bad_jpeg
    write_tar(shards / "shard-00000.tar", samples[:32])
    # shard 1: sample 40 has no caption member; then the tar is cut inside sample 50
    with tarfile.open(shards / "shard-00001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, caption in samples[32:]:
            for ext, data in (("jpg", jpg), ("txt", caption.encode())):
                if key == "000000040" and ext == "txt":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shards / "shard-00001.tar") as tar:
        cut = next(m.offset_data for m in tar.getmembers() if m.name == "000000050.jpg") + 5
    (shards / "shard-00001.tar").write_bytes((shards / "shard-00001.tar").read_bytes()[:cut])
    write_manifest(shards, ["shard-00000.tar", "shard-00001.tar"], [32, 32])
    metrics = train(_cfg(shards, tmp_path / "out", **{"train.epochs": 2, "train.num_workers": 1,
                                                      "debug.keys_log": str(tmp_path / "keys.log")})).metrics
    assert metrics["steps"] == 8  # 64 samples / 16 per step x 2 epochs: the stream refills from its range
    assert metrics["corrupt_samples"] >= 2 and metrics["truncated_shards"] >= 1
    trained = {k for keys in _keys_by_step(tmp_path / "keys.log").values() for k in keys}
    assert "000000003" not in trained and "000000040" not in trained
    assert not trained & {f"{i:09d}" for i in range(50, 64)}  # after the cut
    assert len(trained) == 64 - 2 - 14


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shards_with_no_usable_sample_stop_with_a_clear_error(tmp_path: Path, num_workers: int) -> None:
    from clip.train.streams import DataError

    shards = tmp_path / "shards"
    shards.mkdir()
    tar = shards / "shard-00000.tar"
    write_tar(tar, make_samples(16))
    with tarfile.open(tar) as src:  # keep the captions, make every image undecodable
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as dst:
        for member, data in members:
            if member.name.endswith(".jpg"):
                data = b"\xff\xd8 not a jpeg"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    write_manifest(shards, ["shard-00000.tar"], [16])
    with pytest.raises(DataError, match="samples in a row could not be used"):
        train(_cfg(shards, tmp_path / "out", **{"train.num_workers": num_workers, "train.batch_size": 8}))


def test_resampled_streams_continue_from_a_position_and_train(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=96, per_shard=24)
    manifest = read_manifest(str(tmp_path / "shards"))
    plan = StreamPlan(manifest.shards, num_streams=2, seed=3, resampled=True)
    full = shuffled_stream(RawStream(plan, 0, 1, open_uri, StreamStats()), window=10, start=0)
    keys = [next(full)[1] for _ in range(150)]  # more than the data: shards drawn with replacement
    again = shuffled_stream(RawStream(plan, 0, 1, open_uri, StreamStats()), window=10, start=57)
    assert [next(again)[1] for _ in range(93)] == keys[57:]
    assert len(set(keys)) < len(keys)
    metrics = train(_cfg(tmp_path / "shards", tmp_path / "out", **{
        "train.resampled": True, "train.samples_per_epoch": 80, "train.epochs": 2,
        "debug.keys_log": str(tmp_path / "keys.log")})).metrics
    assert metrics["steps"] == 10  # 80 // 16 steps per epoch, whatever the data size


def _gradient_jpeg() -> bytes:
    from PIL import Image

    x = np.broadcast_to(np.linspace(0, 255, 120)[None, :, None], (90, 120, 1))
    y = np.broadcast_to(np.linspace(0, 255, 90)[:, None, None], (90, 120, 1))
    arr = np.concatenate([x, y, np.full((90, 120, 1), 128.0)], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_gpu_decode_applies_the_cpu_paths_random_resized_crop() -> None:
    """The train.gpu_decode path (run on device "cpu": torchvision decodes there too) crops the box the CPU path
    draws for the same sample seed: same pixels up to the decoder and resampling kernel. Before, it centre-cropped."""
    from clip.train.gpu_decode import gpu_decode_batch
    from clip.train.loader import decode_sample
    from clip.transforms import train_transform

    members = {"jpg": _gradient_jpeg(), "txt": b"a gradient"}
    transform, boxes = train_transform(32), set()
    for seed in range(6):
        cpu, _ = decode_sample(members, transform, seed)
        item, caption = decode_sample(members, None, seed, 32)
        boxes.add(item[1])
        gpu, keep, failed = gpu_decode_batch([item], 32, torch.device("cpu"))
        assert caption == "a gradient" and keep.tolist() == [True] and failed == 0
        diff = (gpu[0] - cpu).abs()
        assert diff.mean() < 0.008 and diff.max() < 0.03, (seed, item[1], float(diff.mean()))
    assert len(boxes) > 3  # the box is random per sample, not a fixed centre crop


def test_gpu_decode_drops_an_undecodable_image_with_its_caption() -> None:
    """An image no decoder can read leaves the batch together with its caption; never a neighbour's copy (one image
    with two captions in a contrastive batch). A PNG (nvjpeg cannot) is decoded on the CPU."""
    from PIL import Image

    from clip.train.gpu_decode import gpu_decode_batch
    from clip.train.loader import Batch, decode_sample
    from clip.train.step import device_inputs

    good = _gradient_jpeg()
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 0, 255)).save(png, format="PNG")
    broken = good[: len(good) // 3]  # the header parses, the pixels do not
    samples = [{"jpg": good, "txt": b"one"}, {"jpg": broken, "txt": b"two"}, {"png": png.getvalue(), "txt": b"three"}]
    items = [decode_sample(m, None, seed, 32) for seed, m in enumerate(samples)]
    assert all(item is not None for item in items)
    assert decode_sample({"jpg": b"\xff\xd8 not an image", "txt": b"x"}, None, 0, 32) is None  # unreadable header
    images, keep, failed = gpu_decode_batch([image for image, _ in items], 32, torch.device("cpu"))
    assert keep.tolist() == [True, False, True] and failed == 1 and images.shape == (2, 3, 32, 32)
    assert not torch.equal(images[0], images[1])
    tokens = torch.arange(3)[:, None].expand(3, 4)
    batch = Batch(epoch=0, step_in_epoch=0, images=[image for image, _ in items], tokens=tokens, keys=["a", "b", "c"],
                  positions={}, corrupt=0, truncated=0)
    images, kept_tokens, failed = device_inputs(batch, 32, torch.device("cpu"))
    assert failed == 1 and kept_tokens[:, 0].tolist() == [0, 2]  # captions one and three: pairs stay pairs


def test_training_inside_a_prefect_flow_with_loader_workers(tmp_path: Path, prefect_harness: None) -> None:
    """Orchestration runs the stage in a flow: forked loader workers must not inherit Prefect's exit hooks and crash."""
    from prefect import flow

    make_shards(tmp_path / "shards", n=64, per_shard=32)

    @flow(name="train-in-flow")
    def train_flow() -> dict:
        return train(_cfg(tmp_path / "shards", tmp_path / "out", **{"train.num_workers": 2})).metrics

    metrics = train_flow()
    assert metrics["steps"] == metrics["total_steps"] > 0
    assert (tmp_path / "out" / "final.pt").exists()


def test_new_data_version_is_not_mistaken_for_a_finished_run(tmp_path: Path) -> None:
    """Weekly reruns: new shards under the same train.output must not report the old run as done."""
    make_shards(tmp_path / "shards", n=64, per_shard=32, seed=0)
    first = train(_cfg(tmp_path / "shards", tmp_path / "out"))
    assert first.steps == first.total_steps
    make_shards(tmp_path / "shards", n=64, per_shard=32, seed=1)  # same names, other samples: a new version
    with pytest.raises(ValueError, match="data version .* use a new train.output"):
        train(_cfg(tmp_path / "shards", tmp_path / "out"))
    again = train(_cfg(tmp_path / "shards", tmp_path / "out-v2"))
    assert again.data_version != first.data_version

