"""Image encoders of the CLIP paper: the Vision Transformer and the modified ResNet.

Both map images [N, 3, S, S] to features [N, embed_dim] (before normalisation). Module and parameter
names match OpenAI's released weights (`visual.conv1`, `visual.class_embedding`, `visual.attnpool.*`, ...).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip.model.config import VisionConfig
from clip.model.transformer import Transformer


class VisionTransformer(nn.Module):
    """Patchify (conv, no bias) -> [class token; patches] + learned positions -> ln_pre -> Transformer
    -> ln_post on the class token -> projection `proj` [W, embed_dim]."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        assert cfg.patch_size is not None and isinstance(cfg.layers, int)
        width = cfg.width
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.grid**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, width // cfg.head_width, cfg.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        scale = self.class_embedding.shape[0] ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        self.transformer.init_weights()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.grad_checkpointing = enabled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [N, g*g+1, W]
        x = self.ln_pre(x)
        x = self.transformer.forward_pooled(x, None)  # [N, W]: only the class token is pooled
        x = self.ln_post(x)
        return x @ self.proj  # [N, embed_dim]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool when strided) -> 1x1 (x4 channels); the shortcut is avgpool -> 1x1 conv -> BN.

    Striding is done by average pooling ("anti-aliased"), never by a strided convolution.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample: nn.Module | None = None
        if stride > 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(in_planes, out_planes, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out_planes)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class AttentionPool2d(nn.Module):
    """Attention pooling: the query is the spatial mean (plus its position), keys/values are all positions.

    Separate q/k/v Linear layers (OpenAI's names); run as one fused matmul through SDPA.
    """

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(spatial**2 + 1, width))
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def init_weights(self) -> None:
        std = self.c_proj.in_features**-0.5
        nn.init.normal_(self.positional_embedding, std=std)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(linear.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [N, HW+1, C]
        x = x + self.positional_embedding.to(x.dtype)
        head_dim = channels // self.heads
        # Only the mean token's output is used, so q is computed for it alone: [N, H, 1, D].
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        weight = torch.cat([self.k_proj.weight, self.v_proj.weight])  # [2C, C]
        bias = torch.cat([self.k_proj.bias, self.v_proj.bias])
        kv = F.linear(x, weight, bias).view(batch, -1, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # [N, H, 1, D]
        return self.c_proj(out.reshape(batch, channels))  # [N, output_dim]


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """While active, BatchNorm layers in `module` normalise with batch statistics but leave their running
    statistics untouched (momentum 0, batch counter restored), so a checkpointed block's recomputation in
    backward does not update them a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms
    ]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class ModifiedResNet(nn.Module):
    """ResNet with a three-convolution stem and average pooling, anti-aliased strides, and attention pooling."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        assert not isinstance(cfg.layers, int)
        width = cfg.width
        self.image_size = cfg.image_size
        self.channels_last = False
        # Stem: three 3x3 convolutions (the first strided by 2), then a 2x2 average pool: S -> S/4.
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._in_planes = width
        self.layer1 = self._make_stage(width, cfg.layers[0], stride=1)
        self.layer2 = self._make_stage(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_stage(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_stage(width * 8, cfg.layers[3], stride=2)
        channels = width * 32  # layer4 output: planes width*8, expansion 4
        self.attnpool = AttentionPool2d(cfg.image_size // 32, channels, channels // cfg.head_width, embed_dim)
        self.grad_checkpointing = False
        self.init_weights()

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(self._in_planes, planes, stride)]
        self._in_planes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        self.attnpool.init_weights()
        # Zero the last BN gain of each block so every residual branch starts as the identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        x = self.avgpool(x)  # [N, width, S/4, S/4]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(
                        block,
                        x,
                        use_reentrant=False,
                        context_fn=lambda block=block: (contextlib.nullcontext(), _bn_stats_frozen(block)),
                    )
                else:
                    x = block(x)
        return self.attnpool(x)  # [N, embed_dim]
