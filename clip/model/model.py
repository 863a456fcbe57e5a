"""The CLIP module: an image encoder and a text encoder joined by a learned temperature.

    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size)
    out = model(images, tokens)  # CLIPOutput: normalised features [N, embed_dim] and exp'd logit scale
    logits = out.logit_scale * out.image_features @ out.text_features.T
    emb = model.encode_image(images, normalize=True)  # unit vectors (default: raw, as OpenAI/open_clip)

State dict layout = OpenAI's released weights (`visual.*`, `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.*`, `ln_final.*`, `text_projection`, `logit_scale`), plus `logit_bias` only when the
config sets `init_logit_bias` (SigLIP's learned bias, clip/sigmoid_loss.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip.model.config import CLIPConfig, get_config
from clip.model.transformer import Transformer
from clip.model.vision import ModifiedResNet, VisionTransformer

LOGIT_SCALE_MAX = 100.0
TEXT_TRIM_MULTIPLE = 8  # the trimmed text length is rounded up to this (steadier shapes for the kernels)


def trimmed_text_length(last_eot: int, context_length: int) -> int:
    """Positions the text tower runs for a batch whose last end-of-text token is at `last_eot`: up to it, rounded
    up to TEXT_TRIM_MULTIPLE, at most the context length (exact: attention is causal)."""
    return min(context_length, -(-(last_eot + 1) // TEXT_TRIM_MULTIPLE) * TEXT_TRIM_MULTIPLE)


def check_token_range(max_id: int, min_id: int, vocab_size: int) -> None:
    """ValueError naming the offending id when a batch's token ids (its highest `max_id`, lowest `min_id`) fall
    outside [0, vocab_size)."""
    if max_id >= vocab_size or min_id < 0:
        bad = max_id if max_id >= vocab_size else min_id
        raise ValueError(f"token id {bad} out of range for vocab_size {vocab_size}")


@dataclass
class CLIPOutput:
    image_features: torch.Tensor  # [N, embed_dim], unit norm
    text_features: torch.Tensor  # [N, embed_dim], unit norm
    logit_scale: torch.Tensor  # scalar: CLIP.scale(), exp(log scale) clamped at LOGIT_SCALE_MAX
    logit_bias: torch.Tensor | None = None  # scalar, SigLIP's learned b; None when the config has no init_logit_bias


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        v, t = config.vision, config.text
        self.visual: nn.Module
        if v.is_resnet:
            self.visual = ModifiedResNet(v, config.embed_dim)
        else:
            self.visual = VisionTransformer(v, config.embed_dim, config.quick_gelu)
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, config.quick_gelu)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias: nn.Parameter | None
        if config.init_logit_bias is None:
            self.register_parameter("logit_bias", None)  # no state-dict key: CLIP checkpoints stay as they are
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        # Run the text encoder only up to the last end-of-text token of the batch (rounded up to 8).
        # Exact: attention is causal, so positions after a sequence's end-of-text never reach its pooled row.
        self.trim_text_padding = True
        # Set by a trainer whose tokens were range-checked and trimmed on the host (clip.train.step): encode_text
        # then skips its own check and trim, the one host sync of an eager forward.
        self.tokens_checked = False
        self.init_weights()

    def init_weights(self) -> None:
        width = self.text_projection.shape[0]
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=width**-0.5)
        with torch.no_grad():
            self.logit_scale.fill_(self.config.init_logit_scale)
            if self.logit_bias is not None:
                self.logit_bias.fill_(self.config.init_logit_bias)

    # ------------------------------------------------------------------------------------------------
    # options that change speed / memory, never results

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (both towers)."""
        self.visual.set_grad_checkpointing(enabled)
        self.transformer.grad_checkpointing = enabled

    def set_channels_last(self, enabled: bool = True) -> None:
        """ResNet towers: keep convolution weights and activations in NHWC (faster convs); no-op for ViTs."""
        if isinstance(self.visual, ModifiedResNet):
            fmt = torch.channels_last if enabled else torch.contiguous_format
            for module in self.visual.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.data = module.weight.data.contiguous(memory_format=fmt)
            self.visual.channels_last = enabled

    # ------------------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.vision.image_size
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"images must be a torch.Tensor of shape [N, 3, {size}, {size}], got {type(images).__name__}"
            )
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected images of shape [N, 3, {size}, {size}], got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images (normalised pixels), got dtype {images.dtype}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        ctx = self.context_length
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of shape [N, {ctx}], got {type(tokens).__name__}")
        if tokens.ndim != 2 or tokens.shape[1] > ctx or tokens.shape[1] == 0:
            raise ValueError(
                f"expected tokens of shape [N, L] with 1 <= L <= {ctx}, got {list(tokens.shape)}"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer token ids (int64 or int32), got dtype {tokens.dtype}")

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [N, 3, S, S] (normalised pixels) -> features [N, embed_dim].

        Unnormalised by default, as OpenAI's CLIP and open_clip; `normalize=True` gives unit vectors.
        """
        self._check_images(images)
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False, packed: bool = False) -> torch.Tensor:
        """tokens [N, L<=context_length] -> features [N, embed_dim], pooled at the end-of-text token.

        Unnormalised by default, as OpenAI's CLIP and open_clip; `normalize=True` gives unit vectors.

        The end-of-text token has the highest id, so its position is `tokens.argmax(-1)` (OpenAI's rule).

        A model whose `tokens_checked` attribute is True (the trainer sets it: clip.train.step.device_inputs checks
        the id range and trims the padding on the host, before the transfer) skips both here, so no host sync.

        `packed=True` (inference) runs each caption's positions up to its end-of-text token only, not the padding
        of the batch's longest one (`Transformer.forward_pooled_packed`); same result.
        """
        self._check_tokens(tokens)
        eot = tokens.argmax(dim=-1)  # [N]
        checked = getattr(self, "tokens_checked", False)
        if not (checked or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            # Eager only (compiled / exported graphs stay static, full length). One host sync gives the
            # id range check and the trim length.
            max_id, min_id, last_eot = torch.stack(
                [tokens.max().long(), tokens.min().long(), eot.max()]
            ).tolist()
            check_token_range(max_id, min_id, self.vocab_size)
            if self.trim_text_padding:
                used = trimmed_text_length(last_eot, tokens.shape[1])
                tokens = tokens[:, :used]
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [N, L, W]
        if packed:
            x = self.transformer.forward_pooled_packed(x, eot)  # [N, W]
        else:
            x = self.transformer.forward_pooled(x, eot, causal=True)  # [N, W]
        features = self.ln_final(x) @ self.text_projection  # [N, embed_dim]
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """The multiplier of the cosine similarities: exp(logit_scale), clamped at LOGIT_SCALE_MAX (the one clamp
        every reader of the scale uses: forward, export's manifest, evaluation)."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def clamp_logit_scale_(self) -> None:
        """Keep the log logit scale in [0, ln LOGIT_SCALE_MAX] in place, after each optimiser update (as CLIP and
        open_clip do): the forward clamp alone zeroes its gradient above the maximum, and Adam's momentum could carry
        the parameter past and leave it there."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(LOGIT_SCALE_MAX))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        return CLIPOutput(
            image_features=self.encode_image(images, normalize=True),
            text_features=self.encode_text(tokens, normalize=True),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
        )


def create_model_from_config(config: CLIPConfig | dict[str, Any]) -> CLIP:
    """Build from a `CLIPConfig` or its `to_dict()` (e.g. a checkpoint's `model_config`)."""
    if isinstance(config, dict):
        config = CLIPConfig.from_dict(config)
    return CLIP(config)


def create_model(name: str, **overrides: Any) -> CLIP:
    """Build the named preset (`list_models()`) with random weights; overrides as in `get_config`."""
    return CLIP(get_config(name, **overrides))
