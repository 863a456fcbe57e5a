"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"),
single process or over a torch.distributed group, without gathering the global batch.

    model = create_model("ViT-B-32", **SIGLIP_INIT)  # the paper's init: t = 10 (log t = ln 10), b = -10
    loss_fn = SigLipLoss()
    out = model(images, tokens)
    loss = loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias)

Every image-text pair of the global batch of N pairs is its own binary classification. With features
L2-normalised, `logit_scale` = t (the multiplier itself, the model's exp'd value) and `logit_bias` = b:

    z_ij = t * x_i . y_j + b,   label_ij = +1 if i == j else -1,
    loss = -(1/N) * sum_i sum_j log sigmoid(label_ij * z_ij)          (normalised by the batch, as the paper)

Distributed (an initialised process group with world size W > 1): every rank must hold the same number n
of rows (N = W n); the counts are not exchanged, so the forward has no host sync. Nothing is all-gathered:
each rank keeps its n images and the text blocks travel around a ring. At step k (k = 0 .. W-1) rank r holds
the text rows of rank (r - k) mod W, received from rank r - 1 while it passes its previous block on to
rank r + 1, and adds its images' loss against that block (the positive pairs are all in the block of
step 0, its own). Memory per rank: one [n, n] logit block and [n, D] text blocks instead of [N, D]
gathered features and an [n, N] logit matrix. The backward runs the ring the other way: the gradient of
each received block goes back to the rank it came from and adds to the gradient of the block that rank
sent on, so each text block's gradient reaches its owner summed over every rank that used it.

Value: rank r returns the loss of its own n image rows against all N texts divided by n (= N / W), i.e.
W times its rows' share of the global loss; the MEAN over ranks equals the single-process loss on the
concatenated batch (one process: n = N, the formula above).

Gradient convention (that of ClipLoss with gather_with_grad=True, clip/loss.py): the gradient reaching
rank r's image and text features is W times the single-process gradient of the global loss, and the
`logit_scale` and `logit_bias` gradients, averaged over ranks, equal the single-process ones. After DDP
averages the parameter gradients (sum / W), every parameter gradient equals the single-process gradient
on the concatenated batch; the training loop needs no extra scaling. tests/test_sigmoid_loss.py checks
this with 2 and 4 gloo processes.

Communication is point-to-point only (`batch_isend_irecv`: 2 (W - 1) messages of [n, D] per rank and
step, as many again in backward), which gloo (CPU) and NCCL (GPU) both provide. With NCCL each process
must have set its CUDA device (`torch.cuda.set_device`), as for any NCCL point-to-point call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clip.loss import check_features, distributed_world

# Model overrides (`create_model(name, **SIGLIP_INIT)`, CLIPConfig fields) for the paper's initialisation.
SIGLIP_INIT: dict[str, float] = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


def _exchange(tensor: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
    """Send `tensor` to rank `send_to` and return the tensor of the same shape that `receive_from` sent."""
    outgoing = tensor.contiguous()
    incoming = torch.empty_like(outgoing)
    requests = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, outgoing, send_to),
        dist.P2POp(dist.irecv, incoming, receive_from),
    ])
    for request in requests:
        request.wait()
    return incoming


class _RingShift(torch.autograd.Function):
    """Forward: pass a block [n, D] to rank + 1, return the block of rank - 1. Backward: the reverse."""

    @staticmethod
    def forward(ctx: Any, block: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.next_rank, ctx.previous_rank = (rank + 1) % world_size, (rank - 1) % world_size
        return _exchange(block, send_to=ctx.next_rank, receive_from=ctx.previous_rank)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # grad_output: d(this rank's loss)/d(the block received from rank - 1); it belongs to that rank. In
        # exchange, rank + 1 returns the gradient of the block we passed to it. Every rank runs its shifts'
        # backwards in the same order (last shift first: each one needs the next one's result), so the
        # sends and receives pair up.
        grad = _exchange(grad_output, send_to=ctx.previous_rank, receive_from=ctx.next_rank)
        return grad, None, None


def _block_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                positives_on_diagonal: bool) -> torch.Tensor:
    """-sum of log sigmoid(label * z) over the block: [n, D] images against [n, D] texts -> []."""
    logits = logit_scale * image @ text.T + logit_bias  # [n, n]
    loss = -F.logsigmoid(-logits).sum()  # every pair as a negative (label -1)
    if positives_on_diagonal:
        # log sigmoid(z) = log sigmoid(-z) + z: turning the diagonal into positives subtracts its logits.
        loss = loss - logits.diagonal().sum()
    return loss


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss over the global batch; distributed (ring, no gather) when a process group is up."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        """image_features, text_features [n, D] (this rank's rows, L2-normalised); logit_scale t and
        logit_bias b: [] -> this rank's value [] (see the module docstring: its mean over ranks is the loss)."""
        check_features(image_features, text_features)
        if image_features.shape[0] == 0:
            raise ValueError("the sigmoid loss needs at least one pair per rank, got 0 rows")
        if logit_bias is None:
            raise ValueError(
                "the sigmoid loss needs a logit_bias: build the model with init_logit_bias set "
                "(clip.sigmoid_loss.SIGLIP_INIT gives the paper's -10)"
            )
        rank, world_size = distributed_world()
        local_n = image_features.shape[0]
        loss = _block_loss(image_features, text_features, logit_scale, logit_bias, positives_on_diagonal=True)
        text_block = text_features
        for _ in range(world_size - 1):  # the blocks of ranks r - 1, r - 2, ...: negatives only
            text_block = _RingShift.apply(text_block, rank, world_size)
            loss = loss + _block_loss(image_features, text_block, logit_scale, logit_bias, positives_on_diagonal=False)
        return loss / local_n
