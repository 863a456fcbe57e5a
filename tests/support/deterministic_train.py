"""A training worker (`pipelines.train` under torchrun) with CUDA's deterministic kernels, for tests/test_gpu.py's
resume test: two runs of the same config are then bit-identical on one GPU, so a resumed run can be compared with
an uninterrupted one at atol 0. No tests here.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python -m torch.distributed.run --standalone --nproc-per-node 1 \
        -m tests.support.deterministic_train --params run.yaml

Why each setting: cuBLAS picks split-K reductions by workspace (CUBLAS_WORKSPACE_CONFIG fixes it); the flash and
memory-efficient attention backward passes add into dq with atomics (the math backend does not); the rest of
the non-deterministic kernels are swapped by `use_deterministic_algorithms` (warn_only: an op without a
deterministic version warns instead of failing, and then shows up as a mismatch).
"""

from __future__ import annotations

import sys

import torch

from pipelines.train import main

if __name__ == "__main__":
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    main(sys.argv[1:])
