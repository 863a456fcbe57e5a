"""CLIP encoders (modified ResNet, Vision Transformer, text Transformer) with named presets.

    from clip.model import create_model, list_models
    model = create_model("tiny-vit", vocab_size=4096)
    out = model(images, tokens)  # CLIPOutput(image_features, text_features, logit_scale[, logit_bias])
    model, tokenizer = build_from_checkpoint(checkpoint_dict, uri)  # a checkpoint's content, read by the caller

Single-device model code: imports torch, nothing of training, configuration (clip.config) or storage (clip.storage).
"""

from clip.model.config import CLIPConfig, ModelConfigError, TextConfig, VisionConfig, get_config, list_models
from clip.model.loading import (
    CheckpointMismatchError,
    StateDictMismatchError,
    build_from_checkpoint,
    check_state_dict,
    config_from_state_dict,
    load_openai_state_dict,
)
from clip.model.model import CLIP, CLIPOutput, create_model, create_model_from_config
from clip.model.transformer import QuickGELU

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "CheckpointMismatchError",
    "ModelConfigError",
    "QuickGELU",
    "StateDictMismatchError",
    "TextConfig",
    "VisionConfig",
    "build_from_checkpoint",
    "check_state_dict",
    "config_from_state_dict",
    "create_model",
    "create_model_from_config",
    "get_config",
    "list_models",
    "load_openai_state_dict",
]
