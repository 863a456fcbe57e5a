"""Both CLIP towers as ONNX models (docs/formats.md "Export bundle"), serialised to bytes in memory.

    image_onnx = export_image_encoder(model, opset=18)   # "image" [B,3,S,S] -> "embedding", "features"
    text_onnx = export_text_encoder(model, opset=18)     # "text" [B,context] int64 -> "embedding"

What was chosen, and why:
- **The dynamo exporter** (`torch.onnx.export(..., dynamo=True)`, torch >= 2.6 with onnxscript): it exports
  every tower of clip/model as written (ViT and modified ResNet, its attention pooling included; SDPA becomes
  plain MatMul/Softmax), so no TorchScript fallback is needed. Opset 18 or newer.
- **Dynamic batch.** The batch axis is declared with `dynamic_shapes` and traced with an example batch of 2 (a
  batch of 1 would let the exporter specialise the axis to 1). The spatial size and the context length stay
  static: the bundle's preprocessing and tokenizer fix them.
- **One file.** The weights are stored inside the model (`model_proto`, no `.onnx.data` beside it): every
  config here is far below protobuf's 2 GB limit, and one file per tower keeps the bundle manifest simple.
- **Text length decided per call, in the graph.** The eager text tower trims the batch to its last end-of-text
  token (`CLIP.trim_text_padding`, a Python-side length); traced as is, one example batch's length would be
  baked into the graph. So the eager trimming is off while tracing, and `TextEncoder` cuts the input at
  `max(argmax(ids)) + 1` with graph ops (an unbacked size, bounded by `torch._check`), then pools at
  `argmax(ids)` under the causal mask. Exact, because positions after a sequence's end-of-text never reach its
  pooled row; and without it onnxruntime would run all 77 positions where eager runs ~16 (slower than eager on
  short captions).
- **Packed text rows.** Within that length the graph goes further: each caption runs its own positions only
  (`CLIP.encode_text(packed=True)`, `Transformer.forward_pooled_packed`): projections, layer norms and MLPs run
  on the T real positions of the batch ([T, W], a NonZero-sized axis), and attention scatters them into
  [B, L, 3W] and gathers its output back. Same argument of exactness (causal attention never reads a later
  position). On a batch of captions of mixed length this roughly halves the text encoder's work (BENCHMARKS.md:
  1.5-1.8x texts/s at batch 32 against the padded graph, same onnxruntime). The parity gate compares against the eager
  padded path on captions of different lengths.
- **Image features.** Besides the projected `embedding` the image model outputs `features`: the pooled
  representation that enters the last projection (ViT: `ln_post` of the class token, [B, width]; modified
  ResNet: the attention-pooled vector before `attnpool.c_proj`, [B, 32*width]), for linear probes.
- **Output names.** The exporter names the token-embedding lookup's value "embedding" itself; internal values
  that collide with a public output name are renamed first, so the graph stays in SSA form.
Every model passes `onnx.checker.check_model(full_check=True)` before it is returned.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import torch
from torch import nn

from clip.model import CLIP
from clip.model.vision import ModifiedResNet

IMAGE_INPUT, TEXT_INPUT = "image", "text"
EMBEDDING_OUTPUT, FEATURES_OUTPUT = "embedding", "features"
MIN_OPSET = 18
TRACE_BATCH = 2  # >= 2: the exporter may specialise an axis traced at size 1
MAX_BATCH = 1 << 16


class ImageEncoder(nn.Module):
    """images [B, 3, S, S] -> (embedding [B, embed_dim], features [B, F]) with the checkpoint's weights."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        visual = model.visual
        self.is_resnet = isinstance(visual, ModifiedResNet)
        if self.is_resnet:
            # The same tower with an identity in place of the final projection: it shares every parameter, so
            # the features are exactly what the eager tower feeds into `attnpool.c_proj`.
            trunk = copy.copy(visual)
            trunk._modules = dict(visual._modules)
            pool = copy.copy(visual.attnpool)
            pool._modules = dict(visual.attnpool._modules)
            pool.c_proj = nn.Identity()
            trunk.attnpool = pool
            self.trunk = trunk
            self.projection = visual.attnpool.c_proj
        else:
            self.visual = visual

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_resnet:
            features = self.trunk(image)  # [B, 32*width]
            return self.projection(features), features
        v = self.visual  # VisionTransformer.forward, stopping to keep the pre-projection features
        x = v.conv1(image).flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        features = v.ln_post(v.transformer.forward_pooled(x, None))  # [B, W]
        return features @ v.proj, features


class TextEncoder(nn.Module):
    """token ids [B, context] -> embedding [B, embed_dim] (`CLIP.encode_text`, unnormalised).

    The batch is cut in the graph at its last end-of-text token (a length computed from the ids of each call, an
    unbacked size for the exporter), so the exported encoder does the work the eager one does on short captions.
    """

    def __init__(self, model: CLIP, packed: bool = True) -> None:
        super().__init__()
        self.model = model
        self.packed = packed

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        used = text.argmax(dim=-1).max().item() + 1  # the end-of-text is the highest id (OpenAI's rule)
        torch._check(used >= 1)
        torch._check(used <= text.shape[1])
        return self.model.encode_text(text[:, :used], packed=self.packed)  # [B, embed_dim]


@contextmanager
def _export_mode(model: CLIP) -> Iterator[None]:
    """eval(), no eager padding trimming, quiet exporter; the model's previous state restored afterwards."""
    was_training, trimmed = model.training, model.trim_text_padding
    model.eval()
    model.trim_text_padding = False
    quiet = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export", "torch.fx", "onnxscript")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        model.train(was_training)
        model.trim_text_padding = trimmed
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def _rename_outputs(ir_model: object, names: list[str]) -> None:
    """Give the graph outputs their public names; internal values already called so are renamed first."""
    graph = ir_model.graph  # type: ignore[attr-defined]
    outputs = list(graph.outputs)
    taken = {value.name for node in graph for value in node.outputs} | {v.name for v in graph.inputs}
    for name in names:
        for node in graph:
            for value in node.outputs:
                if value.name == name and value not in outputs:
                    value.name = f"{name}_internal"
                    while value.name in taken:
                        value.name += "_"
                    taken.add(value.name)
    for value, name in zip(outputs, names, strict=True):
        value.name = name


def _export(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str], opset: int) -> bytes:
    if opset < MIN_OPSET:
        raise ValueError(f"export.opset must be at least {MIN_OPSET}, got {opset}")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.onnx.export(
        module.eval(), (example,), input_names=[input_name], dynamic_shapes={input_name: {0: batch}},
        opset_version=opset, dynamo=True, external_data=False, optimize=True, verbose=False,
    )
    _rename_outputs(program.model, output_names)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def example_images(model: CLIP, batch: int = TRACE_BATCH) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def example_tokens(model: CLIP, batch: int = TRACE_BATCH) -> torch.Tensor:
    """Ids below the top id, with the end-of-text (the highest id) at a different place in each row."""
    ctx, top = model.context_length, model.vocab_size - 1
    tokens = torch.randint(1, top, (batch, ctx), generator=torch.Generator().manual_seed(0))
    for row in range(batch):
        end = min(ctx - 1, 3 + 5 * row)
        tokens[row, end] = top
        tokens[row, end + 1:] = 0
    return tokens


def export_image_encoder(model: CLIP, opset: int = MIN_OPSET) -> bytes:
    """The image tower as a checked ONNX model: "image" -> "embedding", "features"."""
    with _export_mode(model):
        return _export(ImageEncoder(model), example_images(model), IMAGE_INPUT,
                       [EMBEDDING_OUTPUT, FEATURES_OUTPUT], opset)


def export_text_encoder(model: CLIP, opset: int = MIN_OPSET, packed: bool = True) -> bytes:
    """The text tower as a checked ONNX model: "text" (int64) -> "embedding". `packed=False` keeps each batch
    padded to its longest caption (the benchmark's reference for what packing gains)."""
    with _export_mode(model):
        return _export(TextEncoder(model, packed), example_tokens(model), TEXT_INPUT, [EMBEDDING_OUTPUT], opset)
