"""open_clip's twin of one of our models (no tests here): the parity tests in tests/test_model.py and the
`--peer open_clip` side of benchmarks/train_step.py build their peer with it.

open_clip is a test and benchmark extra (never imported by clip/); it is imported when a twin is built.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from clip.model import CLIPConfig


def open_clip_from_config(cfg: CLIPConfig, output_dict: bool = False) -> nn.Module:
    """open_clip's model of the same architecture as our `cfg`, built from an equivalent model-config dict;
    our models' state dicts load into it strictly (same parameter names)."""
    import open_clip

    v, t = cfg.vision, cfg.text
    vision_cfg: dict[str, Any] = {
        "image_size": v.image_size,
        "layers": list(v.layers) if v.is_resnet else v.layers,
        "width": v.width,
        "head_width": v.head_width,
        "mlp_ratio": v.mlp_ratio,
        "patch_size": v.patch_size if not v.is_resnet else None,
    }
    text_cfg = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_ratio,
    }
    return open_clip.CLIP(cfg.embed_dim, vision_cfg, text_cfg, quick_gelu=cfg.quick_gelu, output_dict=output_dict)
