"""Pre-LayerNorm Transformer blocks shared by the text encoder and the Vision Transformer.

Parameter names and shapes follow OpenAI's released CLIP weights (`ln_1`, `attn.in_proj_weight`,
`attn.in_proj_bias`, `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`) so their state dicts load as-is.
Activations are batch-first, [N, L, W]; attention runs through `F.scaled_dot_product_attention` on a
single fused q/k/v projection.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's released CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(quick_gelu: bool) -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU()


def prefix_mask(index: torch.Tensor, length: int) -> torch.Tensor:
    """[N, L] bool: True at positions 0..index[n] of each sequence (what a causal row at index[n] reads)."""
    return torch.arange(length, device=index.device)[None, :] <= index[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout.

    in_proj_weight [3W, W] stacks the q, k, v projections (one matmul); out_proj is a Linear(W, W).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not a multiple of heads {heads}")
        self.width = width
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [N, L, 3W]
        return self.out_proj(self.attend(qkv, causal))

    def attend(self, qkv: torch.Tensor, causal: bool) -> torch.Tensor:
        """Projected q/k/v [N, L, 3W] -> attention output [N, L, W] (before `out_proj`)."""
        batch, length, width = qkv.shape[0], qkv.shape[1], self.width
        # [N, L, 3, H, D] -> [3, N, H, L, D]: views only; SDPA accepts the strided q, k, v.
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [N, H, L, D]
        return out.transpose(1, 2).reshape(batch, length, width)  # [N, L, W]


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", make_activation(quick_gelu)),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(
        self, x: torch.Tensor, causal: bool = False, pooled: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, L, W] -> [N, L, W]; with `pooled`, only the output row at `index` ([N], None: position 0)
        -> [N, W]. Both go through `forward` so that module hooks (FSDP's unsharding) see every call."""
        if pooled:
            return self._forward_one(x, index, causal)
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))

    def forward_packed(self, x: torch.Tensor, rows: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """Causal `forward` on packed rows: x [T, W] holds the positions `rows` ([T], flat indices into
        [N * L]) of N sequences of length L. The per-position work (layer norms, projections, MLP) runs on
        the T rows only; attention scatters q/k/v into [N, L, 3W] (zeros elsewhere) and gathers its output
        back. Exact for every packed row as long as each sequence's packed positions are a prefix: causal
        attention never reads a later position. Inference only: it bypasses module hooks."""
        width = x.shape[1]
        qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)  # [T, 3W]
        qkv = qkv.new_zeros(batch * length, 3 * width).index_copy(0, rows, qkv).view(batch, length, 3 * width)
        out = self.attn.attend(qkv, causal=True).reshape(batch * length, width).index_select(0, rows)  # [T, W]
        x = x + self.attn.out_proj(out)
        return x + self.mlp(self.ln_2(x))

    def _forward_one(self, x: torch.Tensor, index: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Same result as `forward(x)[arange(N), index]`, but the query, attention output and MLP run on
        that one row only (keys and values still see every position). With `causal`, the row at index i
        attends to positions 0..i."""
        if index is None and causal:
            raise ValueError("a causal pooled row needs its index")
        batch, length, width = x.shape
        heads = self.attn.heads
        head_dim = width // heads
        h = self.ln_1(x)  # [N, L, W]
        if index is None:
            row, h_row, mask = x[:, 0], h[:, 0], None
        else:
            rows = torch.arange(batch, device=x.device)
            row, h_row = x[rows, index], h[rows, index]  # [N, W]
            mask = prefix_mask(index, length).view(batch, 1, 1, length) if causal else None
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(h_row, w[:width], b[:width]).view(batch, heads, 1, head_dim)  # [N, H, 1, D]
        kv = F.linear(h, w[width:], b[width:]).view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # [N, H, 1, D]
        row = row + self.attn.out_proj(out.reshape(batch, width))
        return row + self.mlp(self.ln_2(row))  # [N, W]


class Transformer(nn.Module):
    """A stack of pre-LN residual attention blocks (`resblocks.{i}`), [N, L, W] -> [N, L, W]."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = self._run(block, x, causal)
        return x

    def forward_pooled(
        self, x: torch.Tensor, index: torch.Tensor | None, causal: bool = False
    ) -> torch.Tensor:
        """Output at one position per sequence ([N, L, W] -> [N, W]); index None is position 0.

        Equal to `forward(x)[arange(N), index]`: the last block only computes the pooled row.
        """
        for block in self.resblocks[:-1]:
            x = self._run(block, x, causal)
        return self.resblocks[-1](x, causal=causal, pooled=True, index=index)

    def forward_pooled_packed(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`forward_pooled(x, index, causal=True)` that skips the positions after each sequence's pooled one.

        A causal pooled row at index i never depends on positions after i, so every block but the last runs
        on the packed positions 0..index of each sequence only (`ResidualAttentionBlock.forward_packed`):
        on a batch of captions of mixed length most of the padding's work is gone. Inference only (the
        exported text encoder uses it); training keeps `forward_pooled`, whose hooks FSDP needs.
        """
        batch, length, width = x.shape
        rows = prefix_mask(index, length).reshape(-1).nonzero().squeeze(1)  # [T]
        packed = x.reshape(batch * length, width).index_select(0, rows)  # [T, W]
        for block in self.resblocks[:-1]:
            packed = block.forward_packed(packed, rows, batch, length)
        x = packed.new_zeros(batch * length, width).index_copy(0, rows, packed).view(batch, length, width)
        return self.resblocks[-1](x, causal=True, pooled=True, index=index)

    def _run(self, block: nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, causal, use_reentrant=False)
        return block(x, causal=causal)

    def init_weights(self) -> None:
        """OpenAI's scheme: std W^-0.5 for q/k/v, (2W)^-0.5 for the MLP input, smaller for residual outputs."""
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
