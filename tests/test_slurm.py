"""Training under SLURM (infra/slurm/train.sbatch) and the training stage's stop signals (clip/train/stop.py).

* SIGUSR1 to a training process: a step checkpoint at the next logging step, exit status 75, no final.pt; the same
  command resumes from that step and finishes.
* Under torchrun, SIGTERM to rank 1 alone: both ranks stop at the same step, with one checkpoint.
* A real one-node SLURM cluster (munged, slurmctld, slurmd; tests/support/slurm.py): the sbatch script with 2
  tasks on the CPU (gloo) trains to final.pt; a second job gets the time limit's warning (SIGUSR1, as
  `--signal=USR1@120` sends it) and requeues itself, then an `scontrol requeue` (SIGTERM): it resumes from its
  checkpoints both times and ends with the same samples per step and the same weights as the first job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from clip.config import dump_config, load_config
from clip.train.stop import RESUME_EXIT_STATUS
from pipelines.train import torchrun_command
from tests.support.servers import free_port
from tests.support.shards import make_shards
from tests.support.slurm import SlurmCluster, slurm_unavailable
from tests.support.train_config import tiny_overrides
from tests.test_train_distributed import _kill_tree

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "infra" / "slurm" / "train.sbatch"
TOTAL_STEPS = 16  # 128 samples, batch 16, 2 epochs


def _write_params(tmp_path: Path, name: str, **extra: object) -> Path:
    """A tiny run on tmp_path/shards into tmp_path/<name>/out (checkpoints only when stopped), keys logged to
    tmp_path/<name>/keys.log.rank<R>."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = load_config(None, tiny_overrides(str(tmp_path / "shards"), str(folder / "out"), **{
        "train.epochs": 2, "train.checkpoint_every": 1000, "debug.keys_log": str(folder / "keys.log"), **extra}))
    params = folder / "params.yaml"
    params.write_text(dump_config(cfg))
    return params


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""), **extra}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _runs(path: Path) -> list[tuple[int, list[int]]]:
    """The keys log as (from_step, [steps trained]) per start of the process."""
    runs: list[tuple[int, list[int]]] = []
    for record in _records(path):
        if record.get("event") == "start":
            runs.append((record["from_step"], []))
        else:
            runs[-1][1].append(record["step"])
    return runs


def _keys_by_step(path: Path) -> dict[int, list[str]]:
    return {r["step"]: r["keys"] for r in _records(path) if "step" in r}


def _wait(done: object, what: str, proc: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert proc is None or proc.poll() is None, f"the training exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def _trained_to(path: Path, step: int) -> bool:
    runs = _runs(path)
    return bool(runs and runs[-1][1] and runs[-1][1][-1] >= step)


def test_stop_signal_writes_a_checkpoint_and_the_same_command_resumes(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=128, per_shard=32)
    params = _write_params(tmp_path, "run", **{"debug.fault_step_delay_s": 0.3})
    out, keys = tmp_path / "run" / "out", tmp_path / "run" / "keys.log.rank0"
    cmd = [sys.executable, "-m", "pipelines.train", "--params", str(params)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _trained_to(keys, 3), "step 3", proc)
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == RESUME_EXIT_STATUS, stderr[-2000:]
    [(_, steps)] = _runs(keys)
    stopped = steps[-1]  # the logging step after the signal (train.log_every=2): nothing trained is lost
    assert 3 <= stopped < TOTAL_STEPS and stopped % 2 == 0
    assert f"stopped on SIGUSR1 at step {stopped}" in stderr
    assert sorted(p.name for p in out.glob("*.pt")) == [f"step-{stopped:08d}.pt"]  # no final.pt
    assert torch.load(out / f"step-{stopped:08d}.pt", weights_only=True)["step"] == stopped

    subprocess.run(cmd, env=_env(), cwd=tmp_path, check=True, timeout=300, capture_output=True)
    assert _runs(keys)[1] == (stopped, list(range(stopped + 1, TOTAL_STEPS + 1)))
    assert torch.load(out / "final.pt", weights_only=True)["step"] == TOTAL_STEPS


@pytest.mark.heavy
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    import psutil

    make_shards(tmp_path / "shards", n=128, per_shard=32)
    params = _write_params(tmp_path, "run", **{"debug.fault_step_delay_s": 0.3, "compute.nproc_per_node": 2})
    cfg = load_config(str(params), [])
    launcher = subprocess.Popen(torchrun_command(str(params), cfg.compute), env=_env(), cwd=tmp_path)
    try:
        _wait(lambda: _trained_to(tmp_path / "run" / "keys.log.rank1", 3), "step 3", launcher)
        [rank1] = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "pipelines.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        rank1.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        _kill_tree(launcher)
    [(_, steps0)], [(_, steps1)] = (_runs(tmp_path / "run" / f"keys.log.rank{r}") for r in (0, 1))
    assert steps0 == steps1 and steps0[-1] < TOTAL_STEPS  # rank 0 stopped too, at rank 1's step, not hung
    assert sorted(p.name for p in (tmp_path / "run" / "out").glob("*.pt")) == [f"step-{steps0[-1]:08d}.pt"]


@pytest.mark.heavy
def test_sbatch_trains_and_resumes_across_requeues(tmp_path: Path) -> None:
    problem = slurm_unavailable()
    if problem:
        pytest.skip(problem)
    make_shards(tmp_path / "shards", n=128, per_shard=32)
    # The job's environment (sbatch exports it): this python, the rendezvous and gloo on loopback.
    env = _env(CLIP_PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               GLOO_SOCKET_IFNAME="lo")

    def submit(cluster: SlurmCluster, name: str, **extra: object) -> str:
        params = _write_params(tmp_path, name, **extra)
        return cluster.sbatch([f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                               "--gpus-per-node=0", "--time=10", f"--output={tmp_path / name}/slurm-%j.out",
                               str(SBATCH), "--params", str(params)], env=env, cwd=tmp_path)

    def log(name: str) -> str:
        return "\n".join(p.read_text() for p in (tmp_path / name).glob("slurm-*.out"))

    def while_queued(cluster: SlurmCluster, job: str, done: Callable[[], bool], what: str) -> None:
        cluster.wait(lambda: done() or cluster.job_state(job) is None, what, 150)
        assert done(), f"job {job} left the queue before {what}:\n{log('stopped')}"

    with SlurmCluster(tmp_path / "slurm", cpus=2) as cluster:
        whole = submit(cluster, "whole")
        cluster.wait(lambda: cluster.job_state(whole) is None, "end of the first job", 150)
        assert cluster.job_field(whole, "JobState") == "COMPLETED", log("whole")

        stopped = submit(cluster, "stopped", **{"debug.fault_step_delay_s": 0.5})
        keys = tmp_path / "stopped" / "keys.log.rank0"
        while_queued(cluster, stopped, lambda: _trained_to(keys, 2), "step 2")
        cluster.command(["scancel", "--signal=USR1", stopped])  # what --signal=USR1@120 sends before the limit
        while_queued(cluster, stopped, lambda: len(_runs(keys)) == 2 and _trained_to(keys, _runs(keys)[1][0] + 1),
                     "a step after the requeue")
        cluster.command(["scontrol", "requeue", stopped])  # SIGTERM, KillWait, requeued by SLURM itself
        cluster.wait(lambda: cluster.job_state(stopped) is None, "end of the second job", 150)
        assert cluster.job_field(stopped, "JobState") == "COMPLETED", log("stopped")
        assert cluster.job_field(stopped, "Restarts") == "2"

    assert "requeueing job" in log("stopped")  # the script's own requeue after SIGUSR1
    for name in ("whole", "stopped"):
        final = torch.load(tmp_path / name / "out" / "final.pt", weights_only=True)
        assert final["step"] == TOTAL_STEPS
        assert json.loads((tmp_path / name / "out" / "metrics.json").read_text())["world_size"] == 2
    runs = _runs(keys)
    assert [start for start, _ in runs][0] == 0 and len(runs) == 3
    for (start, steps), (next_start, _) in zip(runs, runs[1:], strict=False):
        assert 0 <= start < steps[-1] == next_start  # each stop checkpointed the step it stopped at
    for start, steps in runs:
        assert steps == list(range(start + 1, (steps or [start])[-1] + 1))
    assert runs[-1][1][-1] == TOTAL_STEPS
    checkpoints = {p.name for p in (tmp_path / "stopped" / "out").glob("step-*.pt")}
    assert checkpoints == {f"step-{runs[1][0]:08d}.pt", f"step-{runs[2][0]:08d}.pt"}
    # Stopped twice and resumed, the job trained on the same samples per step to the same weights.
    for rank in (0, 1):
        assert (_keys_by_step(tmp_path / "stopped" / f"keys.log.rank{rank}")
                == _keys_by_step(tmp_path / "whole" / f"keys.log.rank{rank}"))
    a = torch.load(tmp_path / "whole" / "out" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stopped" / "out" / "final.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
