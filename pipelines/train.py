"""Training stage: contrastive training of a CLIP model on the shard stage's output -> train.output.

    python -m pipelines.train [--params params.yaml] [--set train.batch_size=64]   # one process here
    clip-pipeline train                                   # same; one process (in-process, no launcher)
    clip-pipeline train --nproc-per-node 8                # torchrun --standalone on this machine
    clip-pipeline train --nproc-per-node 8 --max-restarts 3   # restart the workers after a failure

Multi-node (run on every node; c10d rendezvous on host:port, node ranks assigned by the rendezvous):

    clip-pipeline train --nnodes 4 --nproc-per-node 8 --rdzv-endpoint head-node:29400

which runs `python -m torch.distributed.run --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d
--rdzv-endpoint head-node:29400 --rdzv-id clip-train -m pipelines.train --params P --set ...`.
`--node-rank` pins a node's rank instead. SLURM: `srun --ntasks-per-node 8 python -m pipelines.train ...`
(one task per GPU); the worker maps SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID / SLURM_NODELIST to
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (clip/train/distributed.py).

`python -m pipelines.train` under a launcher (RANK/WORLD_SIZE or SLURM task variables set) is the worker;
alone it is one process. Outputs (docs/formats.md): step-NNNNNNNN.pt, final.pt, tokenizer.json, metrics.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from clip import storage
from clip.config import PipelineConfig, check_host_port
from pipelines._common import stage_main

DESCRIPTION = "Contrastive training (torchrun, one CPU to many GPU nodes) -> models/checkpoints/."


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Train in this process (one rank of a launched job, or the whole job when alone)."""
    from clip.train import train

    return train(cfg)


def torchrun_command(
    params: str | None,
    overrides: list[str],
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    rdzv_id: str = "clip-train",
) -> list[str]:
    """The `python -m torch.distributed.run ... -m pipelines.train ...` command line for these settings."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("a multi-node run needs --rdzv-endpoint host:port (or compute.rdzv_endpoint)")
        try:
            check_host_port(rdzv_endpoint)
        except ValueError as err:
            raise ValueError(f"--rdzv-endpoint {rdzv_endpoint!r}: {err}") from None
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", rdzv_id]
        if node_rank is not None:
            cmd += ["--node-rank", str(node_rank)]
    cmd += ["--nproc-per-node", str(nproc_per_node), "--max-restarts", str(max_restarts)]
    cmd += ["-m", "pipelines.train"]
    if params is not None:
        cmd += ["--params", params]
    for override in overrides:
        cmd += ["--set", override]
    return cmd


def launch(
    cfg: PipelineConfig,
    params: str | None = None,
    overrides: list[str] | None = None,
    nproc_per_node: int | None = None,
    nnodes: int | None = None,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
) -> dict[str, Any]:
    """One process and no restarts: train in-process. Otherwise run torchrun and wait for it.

    Returns the metrics (read back from train.output/metrics.json after a torchrun job)."""
    nproc = nproc_per_node or cfg.compute.nproc_per_node
    nodes = nnodes or cfg.compute.nnodes
    endpoint = rdzv_endpoint or cfg.compute.rdzv_endpoint
    if nproc == 1 and nodes == 1 and max_restarts == 0:
        return run(cfg)
    cmd = torchrun_command(params, list(overrides or []), nproc, nodes, node_rank, endpoint, max_restarts)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"training failed: torchrun exited with status {result.returncode} ({' '.join(cmd)})")
    uri = storage.join(cfg.train.output, "metrics.json")
    return json.loads(storage.read_bytes(uri, cfg.storage)) if storage.exists(uri, cfg.storage) else {}


def main(argv: list[str] | None = None) -> None:
    stage_main(run, DESCRIPTION, argv)


if __name__ == "__main__":
    main()
