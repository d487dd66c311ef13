"""The memory items of a distillation run for `ivl plan` (`ivl.plan.plan_distill` adds the runtime's own).

Teacher and student shapes come from the ViT presets (`ivl.distill.models.VIT_PRESETS`); a hub teacher is recognised by
name (InternViT-6B / InternViT-300M, or an InternVL checkpoint through the zoo) without downloading. A micro-batch is
`loop.batch_size` tiles of `image_size` px, each (image_size / 14)^2 patches + CLS.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from ivl.config import ConfigError
from ivl.plan_tables import vision_layer_bytes_per_token

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def teacher_vision_config(name_or_path: str) -> InternVLVisionConfig:
    """The teacher's ViT config from its preset, an InternViT hub name, or an InternVL zoo name."""
    from ivl.distill.models import preset_of, vision_config
    from ivl.model.load import ModelConfig, model_config_of

    preset = preset_of(name_or_path)
    if preset is not None:
        return vision_config(preset)
    name = name_or_path.lower()
    for size in ("6b", "300m"):
        if f"internvit-{size}" in name:
            return vision_config(f"internvit-{size}")
    try:
        return model_config_of(ModelConfig(name_or_path=name_or_path)).vision_config
    except (OSError, ValueError) as error:
        raise ConfigError(f"teacher.name_or_path: cannot tell the shape of {name_or_path!r}: {error}") from error


def _parameters(config: InternVLVisionConfig) -> tuple[int, int]:
    """(all parameters, those in linear layers) of a ViT, counted on the meta device."""
    with torch.device("meta"):
        model = InternVLVisionModel(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in model.parameters()), linear


def _tokens(config: InternVLVisionConfig, tiles: int) -> int:
    image, patch = config.image_size, config.patch_size
    side = (image[0] if isinstance(image, (list, tuple)) else image) // (patch[0] if isinstance(patch, (list, tuple))
                                                                         else patch)  # fmt: skip
    return tiles * (side * side + 1)


def distill_items(config, dtype: torch.dtype, act_bytes: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Teacher weights and forward pass (online), student + adaptors (fp32 masters, gradients, optimizer states),
    student activations and the layer targets the loss compares."""
    from ivl.distill.models import vision_config

    student = vision_config(config.student.preset)
    teacher = teacher_vision_config(config.teacher.name_or_path)
    pairs = len(config.loss.layer_pairs(student.num_hidden_layers, teacher.num_hidden_layers))
    tiles = config.loop.batch_size
    tokens = _tokens(student, tiles)
    student_params = _parameters(student)[0] + pairs * (student.hidden_size + 1) * teacher.hidden_size
    states = {"adamw": 8}.get(config.optim.optimizer, 2)  # bitsandbytes 8-bit: 2 one-byte states per value
    items = {
        "student + adaptors (fp32)": student_params * 4,
        "gradients (fp32)": student_params * 4,
        f"optimizer states ({config.optim.optimizer})": student_params * states,
    }
    per_layer = vision_layer_bytes_per_token(student, "full", act_bytes, 0, 0)
    if config.student.gradient_checkpointing:
        saved = student.num_hidden_layers * tokens * student.hidden_size * act_bytes + tokens * per_layer
    else:
        saved = student.num_hidden_layers * tokens * per_layer
    items["student activations"] = saved
    # Adaptor outputs (teacher width) and the fp32 targets they are compared with, one per layer pair.
    items["layer targets + adaptor outputs"] = pairs * tokens * teacher.hidden_size * (act_bytes + 4)
    if config.mode == "online":
        total, linear = _parameters(teacher)
        weight_bytes = DTYPE_BYTES[dtype]
        int8 = config.teacher.quantize == "int8"
        items["teacher weights" + (" (int8)" if int8 else "")] = (
            linear * 1 + (total - linear) * weight_bytes if int8 else total * weight_bytes
        )
        # No graph: one teacher layer's working set at a time (hidden, attention output, MLP intermediate).
        items["teacher forward (no grad)"] = tokens * (3 * teacher.hidden_size + teacher.intermediate_size) * act_bytes
    workload = {"tiles": tiles, "tokens": tokens, "layer_pairs": pairs, "mode": config.mode}
    return items, workload
