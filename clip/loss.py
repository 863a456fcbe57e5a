"""CLIP's symmetric contrastive (InfoNCE) loss, single process or over a torch.distributed group.

    loss_fn = ClipLoss(local_loss=False)
    loss = loss_fn(image_features, text_features, logit_scale)   # features L2-normalised, [N, D]

The loss contract the trainer relies on (clip.sigmoid_loss.SigLipLoss keeps it too):
`loss_fn(image_features [n, D], text_features [n, D], logit_scale [], logit_bias [] | None = None) -> []`, the
rows this rank holds; the loss does its own cross-rank communication. CLIP's loss has no bias: a non-None
`logit_bias` is refused.

`logit_scale` is the multiplier itself (the model's `logit_scale.exp()`, at most 100 in CLIP), not its log.

Single process: logits = logit_scale * image @ text.T ([N, N]); the loss is the mean of the image->text and
text->image cross-entropies with the diagonal as targets.

Distributed (an initialised process group with world size W > 1): the features of all ranks are
all-gathered so the contrast runs over the global batch of N pairs. Ranks may hold different numbers of
rows n_r (a ragged last batch): sizes are exchanged first and the gather pads to the largest. That exchange
reads the sizes on the host (a device sync); `equal_batches=True` skips it when the caller guarantees that every
rank holds the same number of rows (the trainer: the loader gives every rank the same batch), so a step
stays free of host syncs. A caller that breaks that promise gets a failed or mismatched all_gather.

* full matrix (`local_loss=False`): every rank computes the whole N x N loss; the value equals the
  single-process loss on the concatenated batch.
* local loss (`local_loss=True`): rank r computes only its own n_r rows against all N columns, targets
  offset by the rows of lower ranks; O(n N) instead of O(N^2) memory. Each rank's value is weighted by
  n_r * W / N (1 for equal batches) so that the MEAN over ranks equals the single-process loss.

Gradient convention (`gather_with_grad=True`, the default): the gather's backward SUMS the gradients
that every rank's loss sends to a feature (an all-reduce of the gathered gradient, then this rank's
slice). The gradient reaching rank r's local features is therefore W times the single-process gradient
of the global loss, in both variants; the `logit_scale` gradients, averaged over ranks, equal the
single-process one (full matrix: every rank has it whole; local loss: each rank has its rows' part,
times W). So after DDP averages parameter gradients over ranks (sum / W), every parameter gradient,
encoders and `logit_scale` alike, equals the single-process gradient on the concatenated batch. No extra scaling
is needed in the training loop. tests/test_loss.py checks this with 2 and 4 gloo processes.

`gather_with_grad=False` gathers without autograd and puts the local features back in with their graph.
Full matrix: each rank's local feature gradient is then exactly the single-process gradient, so after
DDP averaging the encoder gradients are 1/W of it (a learning-rate rescale). With `local_loss=True` the
gradient misses the terms where a feature acts as a column of another rank's rows: an approximation
(as in open_clip), kept for memory, not recommended.

The gather uses plain `all_gather` / `all_reduce`, which gloo (CPU) and NCCL (GPU) both provide.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the default group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_sizes(local_size: int, device: torch.device, world_size: int) -> list[int]:
    """Every rank's row count, in rank order (ranks may hold different numbers of rows)."""
    mine = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(sizes, mine)
    return [int(size) for size in torch.cat(sizes).tolist()]


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather needs equal shapes: pad [n_r, D] to [max n, D], gather, drop the padding -> [sum n, D]."""
    longest = max(sizes)
    if tensor.shape[0] < longest:
        tensor = torch.cat([tensor, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])])
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _AllGatherWithGrad(torch.autograd.Function):
    """[n_r, D] on each rank -> [sum n, D] in rank order; backward sums each row's gradient over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # grad_output [sum n, D] holds d(this rank's loss)/d(every gathered row). The total gradient of
        # our rows is the sum over ranks of their copy of them: all-reduce everything, keep our slice.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None, None


def _gather_rows(tensor: torch.Tensor, sizes: list[int], rank: int, with_grad: bool) -> torch.Tensor:
    if with_grad:
        return _AllGatherWithGrad.apply(tensor, sizes, rank)
    # No autograd through the gather: splice the local tensor (with its graph) back in at our rows.
    with torch.no_grad():
        gathered = _gather_padded(tensor.detach(), sizes)
    start = sum(sizes[:rank])
    return torch.cat([gathered[:start], tensor, gathered[start + tensor.shape[0] :]])


def check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """ValueError unless both are [n, D] of one shape (the contract of every loss here)."""
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be [N, D]; got image {tuple(image_features.shape)}, text {tuple(text_features.shape)}"
        )
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features differ in shape: {tuple(image_features.shape)} vs {tuple(text_features.shape)}"
        )


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over image-text similarities; distributed when a process group is up."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = True,
                 equal_batches: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.equal_batches = equal_batches  # every rank holds as many rows as this one: no size exchange
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def _targets(self, device: torch.device, num_rows: int, offset: int) -> torch.Tensor:
        """Row i's positive is column offset + i: LongTensor [num_rows]."""
        key = (device, num_rows, offset)
        labels = self._labels.get(key) if self.cache_labels else None
        if labels is None:
            labels = torch.arange(offset, offset + num_rows, device=device, dtype=torch.long)
            if self.cache_labels:
                self._labels[key] = labels
        return labels

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        if logit_bias is not None:
            raise ValueError("ClipLoss (train.loss=clip) takes no logit_bias: the softmax loss has no bias; a model "
                             "with a logit bias trains with train.loss=siglip")
        check_features(image_features, text_features)
        rank, world_size = distributed_world()
        local_n = image_features.shape[0]
        if world_size == 1:
            logits_per_image = logit_scale * image_features @ text_features.T  # [N, N]
            logits_per_text = logits_per_image.T
            targets = self._targets(image_features.device, local_n, 0)
        else:
            if self.equal_batches:
                sizes = [local_n] * world_size
            else:
                sizes = _batch_sizes(local_n, image_features.device, world_size)
            total_n, offset = sum(sizes), sum(sizes[:rank])
            all_image = _gather_rows(image_features, sizes, rank, self.gather_with_grad)  # [sum n, D]
            all_text = _gather_rows(text_features, sizes, rank, self.gather_with_grad)  # [sum n, D]
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T  # [n, sum n]
                logits_per_text = logit_scale * text_features @ all_image.T  # [n, sum n]
                if local_n == 0:  # nothing to contrast here, but stay in the graph: backward all-reduces
                    return 0.0 * (logits_per_image.sum() + logits_per_text.sum())
                targets = self._targets(image_features.device, local_n, offset)
                # Each rank's mean is over its own n rows; weigh by n * W / N so that the mean over ranks
                # is the global mean over all N rows even when ranks hold different batch sizes.
                weight = local_n * world_size / total_n
                loss = F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)
                return 0.5 * weight * loss
            logits_per_image = logit_scale * all_image @ all_text.T  # [N, N]
            logits_per_text = logits_per_image.T
            targets = self._targets(image_features.device, total_n, 0)
        return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets))
