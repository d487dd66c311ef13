"""Standalone InternViT models (HF-native `InternVLVisionModel`) for distillation: presets, building, and the hidden
states of chosen layers.

Parameter names come from `ivl.model.parts.HF_NAMES` (the one place that knows InternVL's module names) with the
vision tower's prefix removed, since here the ViT is a model of its own rather than `model.vision_tower`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, InternVLVisionConfig, InternVLVisionModel

from ivl.config import ConfigError
from ivl.model.parts import HF_NAMES, PART_PREFIXES
from ivl.model.presets import VISION

VISION_PREFIX = PART_PREFIXES["vision"][0]  # "model.vision_tower."
PRESET_PREFIX = "preset:"

# Encoders by name. The real ones are the table of docs/design/model.md at 448 px; the tiny ones use 112 px tiles (8 x 8
# patches + CLS) so CPU tests and the bench run in seconds. `tiny-teacher` is InternViT-6B-styled (RMSNorm, QK-norm, no
# qkv bias) and wider / deeper than `tiny-student`, which is InternViT-300M-styled (LayerNorm, qkv bias) like the real
# student.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "internvit-300m": {**VISION["internvit-300m"], "image_size": 448},
    "internvit-6b": {**VISION["internvit-6b"], "image_size": 448},
    "tiny-teacher": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                         norm_type="rms_norm", use_qk_norm=True, attention_bias=False, image_size=112),
    "tiny-student": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         norm_type="layer_norm", use_qk_norm=False, attention_bias=True, image_size=112),
}  # fmt: skip
# A tiny random CLIP ViT (4 x 4 patches at 56 px, the student's width) to test the CLIP -> student initialisation.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-clip": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      image_size=56, patch_size=14),
}  # fmt: skip


def preset_of(name_or_path: str) -> str | None:
    return name_or_path[len(PRESET_PREFIX) :] if name_or_path.startswith(PRESET_PREFIX) else None


def vision_config(preset: str, **overrides: Any) -> InternVLVisionConfig:
    """The `InternVLVisionConfig` of a ViT preset (patch 14, mean pooling: the final norm is the identity)."""
    if preset not in VIT_PRESETS:
        raise ConfigError(f"unknown ViT preset {preset!r}; known: {', '.join(VIT_PRESETS)}")
    fields = {"patch_size": 14, "layer_norm_eps": 1e-6, "use_mean_pooling": True, **VIT_PRESETS[preset], **overrides}
    return InternVLVisionConfig(**fields)


def clip_config(preset: str) -> CLIPVisionConfig:
    if preset not in CLIP_PRESETS:
        raise ConfigError(f"unknown CLIP preset {preset!r}; known: {', '.join(CLIP_PRESETS)}")
    return CLIPVisionConfig(**CLIP_PRESETS[preset])


def build_vision_model(config: InternVLVisionConfig, seed: int, dtype: torch.dtype = torch.float32):
    """A random-weight InternViT, the same for the same seed whatever the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLVisionModel(config)
    return model.to(dtype)


def vision_name(role: str, layer: int | None = None) -> str:
    """A standalone InternVLVisionModel's module name for `role` (a key of `parts.HF_NAMES`, e.g. `vision.q`)."""
    name = HF_NAMES[role]
    name = name.format(i=layer) if layer is not None else name
    return name[len(VISION_PREFIX) :]


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a standalone InternViT."""
    layer_path = vision_name("vision.norm1", 0).rsplit(".0.", 1)[0]  # "encoder.layer"
    return model.get_submodule(layer_path)


def image_size_of(config: InternVLVisionConfig | CLIPVisionConfig) -> int:
    size = config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def patch_size_of(config: InternVLVisionConfig | CLIPVisionConfig) -> int:
    size = config.patch_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def resolve_layer(index: int, num_layers: int, what: str) -> int:
    """A layer index counted from the end when negative (-1: the last layer) -> 0-based from the start."""
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise ConfigError(f"{what}: layer {index} does not exist in a {num_layers}-layer ViT")
    return resolved


def hidden_states(model: nn.Module, pixel_values: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """Outputs of encoder layers `layers` (0-based): {layer: [B, 1 + num_patches, width]}, CLS first.

    Runs the embeddings and the layers one by one and stops after the deepest layer asked for, so a teacher
    supervised below its top layer never computes the rest. Layers checkpoint themselves when the model has gradient
    checkpointing on (HF's `GradientCheckpointingLayer`). With `use_mean_pooling` InternViT's final norm is the
    identity, so the last layer's output is the model's `last_hidden_state`.
    """
    embeddings = model.get_submodule(vision_name("vision.cls").rsplit(".", 1)[0])
    hidden = embeddings(pixel_values.to(model.dtype))
    wanted, outputs = set(layers), {}
    for index, layer in enumerate(vision_layers(model)):
        if index > max(wanted):
            break
        hidden = layer(hidden)
        if index in wanted:
            outputs[index] = hidden
    return outputs
