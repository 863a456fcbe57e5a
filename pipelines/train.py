"""Training stage: contrastive training of a CLIP model on the shard stage's output -> train.output.

    python -m pipelines.train [--params params.yaml] [--set train.batch_size=64]   # one process here
    python -m pipelines.train --set compute.nproc_per_node=8                      # torchrun --standalone here
    python -m pipelines.train --set compute.nproc_per_node=8 --set compute.max_restarts=3  # restarts on failure

Multi-node (run on every node; c10d rendezvous on host:port, node ranks assigned by the rendezvous unless
`compute.node_rank` pins them):

    python -m pipelines.train --set compute.nnodes=4 --set compute.nproc_per_node=8 \\
        --set compute.rdzv_endpoint=head-node:29400

which writes the resolved config to a temporary params file and runs `python -m torch.distributed.run --nnodes 4
--nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head-node:29400 --rdzv-id clip-train --max-restarts 0
-m pipelines.train --params <that file>`: every worker trains on exactly the config resolved here. SLURM:
`srun --ntasks-per-node 8 python -m pipelines.train ...` (one task per GPU; `sbatch infra/slurm/train.sbatch`
adds checkpoints and requeues at the time limit); the worker maps SLURM_PROCID /
SLURM_STEP_NUM_TASKS / SLURM_LOCALID / SLURM_NODELIST to RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
(clip/train/distributed.py).

Under a launcher (RANK / WORLD_SIZE or SLURM task variables set) this module is the worker; alone it trains in
this process when one process is asked for (compute.nproc_per_node = compute.nnodes = 1, compute.max_restarts = 0)
and launches torchrun otherwise. SIGUSR1 / SIGTERM (a scheduler's warning before the time limit, a requeue,
a preemption): a step checkpoint at the next logging or checkpoint step, then exit status 75; the same command
resumes (clip/train/stop.py). Outputs (docs/formats.md): step-NNNNNNNN.pt, final.pt, tokenizer.json,
metrics.json in train.output; reports/metrics/train.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from clip import storage
from clip.config import ComputeConfig, PipelineConfig, dump_config
from clip.formats.metrics import TRAIN_EPOCHS_PLOT, TRAIN_LOSS_PLOT, plots_uri
from clip.progress import Progress
from clip.result import StageResult
from clip.train import stage
from clip.train.distributed import under_launcher
from clip.train.report import load_result
from clip.train.stop import RESUME_EXIT_STATUS, ignore_stop_signals
from pipelines._common import is_rank_zero, stage_main

WORKER_MODULE = "pipelines.train"


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    """Train: in this process (a launched worker, or the whole job when one process is asked for), or through
    torchrun, waiting for it (its result is read back from train.output)."""
    if under_launcher() or is_single_process(cfg.compute):
        try:
            result = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                               progress=progress, debug=cfg.debug)
        except stage.TrainingStopped as stopped:
            # Not a failure: a scheduler asked for the machine back. The status tells a batch script to requeue
            # (infra/slurm/train.sbatch); the same command then resumes from the checkpoint just written.
            ignore_stop_signals()  # on its way out: srun's SIGTERM to the slower ranks must not change the status
            if is_rank_zero():
                print(f"train: {stopped}", file=sys.stderr, flush=True)
            raise SystemExit(RESUME_EXIT_STATUS) from None
    else:
        result = launch_torchrun(cfg)
    if is_rank_zero():
        publish_loss_curve(result, cfg)
    return result


def publish_loss_curve(result: StageResult, cfg: PipelineConfig) -> None:
    """The run's loss curve and per-epoch curve copied to reports/plots/train_loss.csv and train_epochs.csv, where
    `dvc plots show` reads them (local, like the metrics; the run folder may be on S3)."""
    for output, plot in (("loss_curve", TRAIN_LOSS_PLOT), ("epoch_curve", TRAIN_EPOCHS_PLOT)):
        source = result.outputs.get(output)
        if source and storage.exists(source, cfg.storage):
            storage.write_bytes(plots_uri(plot), storage.read_bytes(source, cfg.storage))


def is_single_process(compute: ComputeConfig) -> bool:
    """One process and nothing to restart: no launcher needed."""
    return compute.nproc_per_node == 1 and compute.nnodes == 1 and compute.max_restarts == 0


def torchrun_command(params_file: str, compute: ComputeConfig, rdzv_id: str = "clip-train") -> list[str]:
    """The `python -m torch.distributed.run ... -m pipelines.train --params <params_file>` command line for the
    launcher settings of `compute` (nproc_per_node, nnodes, node_rank, rdzv_endpoint, max_restarts)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if compute.nnodes == 1 and compute.rdzv_endpoint is None:
        cmd += ["--standalone"]
    else:
        if compute.rdzv_endpoint is None:
            raise ValueError("a multi-node run needs compute.rdzv_endpoint (host:port of the c10d rendezvous)")
        cmd += ["--nnodes", str(compute.nnodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", compute.rdzv_endpoint, "--rdzv-id", rdzv_id]
        if compute.node_rank is not None:
            cmd += ["--node-rank", str(compute.node_rank)]
    cmd += ["--nproc-per-node", str(compute.nproc_per_node), "--max-restarts", str(compute.max_restarts)]
    return cmd + ["-m", WORKER_MODULE, "--params", params_file]


def write_worker_params(cfg: PipelineConfig, folder: str | Path) -> str:
    """The resolved config as a params file in `folder`, for the workers to load exactly what was resolved here."""
    path = Path(folder) / "params.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    return str(path)


def launch_torchrun(cfg: PipelineConfig) -> StageResult:
    """Run the job under torchrun and wait for it; the result is the run's metrics.json (empty when this node
    has no copy of train.output, e.g. a node other than rank 0's writing to a local folder)."""
    nproc = cfg.compute.nproc_per_node
    # One data version for the whole job: the workers, their restarts and the result read below all use the
    # version folder latest.json names now, whatever is published meanwhile.
    cfg = cfg.model_copy(update={"train": stage.pin_data_version(cfg.train, cfg.storage)})
    # The params file lives as long as torchrun: restarted workers read it again.
    with tempfile.TemporaryDirectory(prefix="clip-train-") as folder:
        cmd = torchrun_command(write_worker_params(cfg, folder), cfg.compute)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
        returncode = subprocess.run(cmd, env=env, check=False).returncode
    if returncode != 0:
        raise SystemExit(f"training failed: torchrun exited with status {returncode} ({' '.join(cmd)})")
    return load_result(stage.run_location(cfg.train, cfg.storage), cfg.storage) or StageResult()


def main(argv: list[str] | None = None) -> None:
    stage_main("train", run, argv)


if __name__ == "__main__":
    main()
