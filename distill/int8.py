"""bitsandbytes LLM.int8() for the teacher's linear layers (optional backend: imported only when asked for).

The teacher only runs forward passes, so its encoder's linear layers can be int8 (about half the memory of bf16;
InternViT-6B: ~6 GB instead of ~11 GB) at some cost in fidelity, which `teacher_fidelity` measures against the
bf16 teacher. The patch embedding, norms and layer scales stay in the teacher's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ivl.config import ConfigError
from ivl.distill.models import hidden_states, vision_layers


def quantize_int8(model: nn.Module, device: torch.device | str, threshold: float = 6.0) -> nn.Module:
    """Replace every nn.Linear of the encoder layers by a bitsandbytes `Linear8bitLt` holding the same weights;
    quantisation happens when the layer moves to `device`. `threshold`: LLM.int8()'s outlier threshold."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ConfigError("teacher.quantize=int8 needs bitsandbytes (pip install bitsandbytes)") from error
    for layer in vision_layers(model):
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            quantized = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                            has_fp16_weights=False, threshold=threshold)  # fmt: skip
            quantized.weight = bnb.nn.Int8Params(module.weight.data, requires_grad=False, has_fp16_weights=False)
            if module.bias is not None:
                quantized.bias = nn.Parameter(module.bias.data, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, quantized)
    return model.to(device)


@torch.no_grad()
def teacher_fidelity(reference: nn.Module, quantized: nn.Module, pixel_values: Tensor, layers: list[int]) -> dict:
    """Mean per-token cosine between the int8 and the reference teacher's hidden states, per layer."""
    ours = hidden_states(quantized, pixel_values, layers)
    theirs = hidden_states(reference, pixel_values, layers)
    return {
        layer: torch.nn.functional.cosine_similarity(ours[layer].float(), theirs[layer].float(), dim=-1).mean().item()
        for layer in layers
    }
