"""The one module that knows InternVL's module names (HF-native `InternVLForConditionalGeneration`).

Everything else asks here: which submodule is the ViT and its layers, the projector, the LLM and its layers, which
part a parameter belongs to, and which linear layers LoRA may target in each part. Both the ViT and the LLM contain
`q_proj`-like names, so LoRA targets are always scoped by part prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ivl.config import ConfigError

Part = Literal["vision", "projector", "llm"]
PARTS: tuple[Part, ...] = ("vision", "projector", "llm")

LM_HEAD_MODULE = "lm_head"
# Parameter-name prefixes of each part, relative to InternVLForConditionalGeneration.
PART_PREFIXES: dict[Part, tuple[str, ...]] = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", LM_HEAD_MODULE + "."),
}

# Linear layers LoRA targets inside each part, by LLM family (docs/design/trainability.md). InternLM2 checkpoints are
# LLaMA-structured once HF-native (wqkv -> q/k/v_proj, w1/w3/w2 -> gate/up/down_proj); Phi-3 keeps fused qkv and
# gate_up.
LLM_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "internlm2": ("wqkv", "wo", "w1", "w2", "w3"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
PROJECTOR_LORA_TARGETS = ("linear_1", "linear_2")

# HF-native module (or bare parameter) names by role, `{i}` a layer index, for converting checkpoints written in other
# layouts (`ivl.model.convert` holds the original InternVLChatModel names for the same roles). The LLM roles cover
# LLaMA-structured families (Qwen2, LLaMA, InternLM2 once converted) and Phi-3's fused `qkv_proj` / `gate_up_proj`.
_VISION_LAYER = "model.vision_tower.encoder.layer.{i}."
_LLM_LAYER = "model.language_model.layers.{i}."
HF_NAMES: dict[str, str] = {
    "vision.cls": "model.vision_tower.embeddings.cls_token",
    "vision.position": "model.vision_tower.embeddings.position_embeddings",
    "vision.patch": "model.vision_tower.embeddings.patch_embeddings.projection",
    "vision.q": _VISION_LAYER + "attention.q_proj",
    "vision.k": _VISION_LAYER + "attention.k_proj",
    "vision.v": _VISION_LAYER + "attention.v_proj",
    "vision.q_norm": _VISION_LAYER + "attention.q_norm",
    "vision.k_norm": _VISION_LAYER + "attention.k_norm",
    "vision.out": _VISION_LAYER + "attention.projection_layer",
    "vision.fc1": _VISION_LAYER + "mlp.fc1",
    "vision.fc2": _VISION_LAYER + "mlp.fc2",
    "vision.norm1": _VISION_LAYER + "layernorm_before",
    "vision.norm2": _VISION_LAYER + "layernorm_after",
    "vision.scale1": _VISION_LAYER + "lambda_1",
    "vision.scale2": _VISION_LAYER + "lambda_2",
    "projector.norm": "model.multi_modal_projector.layer_norm",
    "projector.linear1": "model.multi_modal_projector.linear_1",
    "projector.linear2": "model.multi_modal_projector.linear_2",
    "llm.embed": "model.language_model.embed_tokens",
    "llm.q": _LLM_LAYER + "self_attn.q_proj",
    "llm.k": _LLM_LAYER + "self_attn.k_proj",
    "llm.v": _LLM_LAYER + "self_attn.v_proj",
    "llm.qkv": _LLM_LAYER + "self_attn.qkv_proj",
    "llm.o": _LLM_LAYER + "self_attn.o_proj",
    "llm.gate": _LLM_LAYER + "mlp.gate_proj",
    "llm.up": _LLM_LAYER + "mlp.up_proj",
    "llm.gate_up": _LLM_LAYER + "mlp.gate_up_proj",
    "llm.down": _LLM_LAYER + "mlp.down_proj",
    "llm.input_norm": _LLM_LAYER + "input_layernorm",
    "llm.post_norm": _LLM_LAYER + "post_attention_layernorm",
    "llm.norm": "model.language_model.norm",
    "lm_head": LM_HEAD_MODULE,
}
# transformers writes InternVL checkpoints under these older prefixes (the layout of the `-hf` checkpoints on the hub)
# and renames them back while loading; converted checkpoints are written the same way and read in either form.
SAVED_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    LM_HEAD_MODULE + ".": "language_model.lm_head.",
}


def saved_name(name: str) -> str:
    """The name transformers gives parameter `name` in a checkpoint file."""
    for prefix, saved in SAVED_PREFIXES.items():
        if name.startswith(prefix):
            return saved + name[len(prefix) :]
    return name


def loaded_name(name: str) -> str:
    """The model's parameter name for a name found in an HF-native checkpoint file (saved or model form)."""
    for prefix, saved in SAVED_PREFIXES.items():
        if name.startswith(saved):
            return prefix + name[len(saved) :]
    return name


@dataclass(frozen=True)
class ModelParts:
    """Handles on the parts of one InternVL model (the modules themselves, not copies)."""

    multimodal: nn.Module  # InternVLModel: embeds the text, puts the image features in place, runs the LLM
    vision: nn.Module
    vision_embeddings: nn.Module
    vision_layers: nn.ModuleList
    projector: nn.Module
    llm: nn.Module
    llm_embeddings: nn.Module
    llm_layers: nn.ModuleList
    lm_head: nn.Module


def unwrap(model: nn.Module) -> nn.Module:
    """The `InternVLForConditionalGeneration` inside PEFT / DDP / compile wrappers."""
    while True:
        # By the class hierarchy: FSDP2 swaps the class for a subclass named e.g. `FSDPPeftModel`.
        if hasattr(model, "get_base_model") and any(c.__name__.startswith("Peft") for c in type(model).__mro__):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrappers
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def model_parts(model: nn.Module) -> ModelParts:
    base = unwrap(model)
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "vision_tower"):
        raise TypeError(
            f"expected an HF-native InternVLForConditionalGeneration, got {type(base).__name__}; original-format "
            "(InternVLChatModel) checkpoints must be converted to the -hf layout first"
        )
    vision, llm = inner.vision_tower, inner.language_model
    return ModelParts(
        multimodal=inner,
        vision=vision,
        vision_embeddings=vision.embeddings,
        vision_layers=vision.encoder.layer,
        projector=inner.multi_modal_projector,
        llm=llm,
        llm_embeddings=llm.embed_tokens,
        llm_layers=llm.layers,
        lm_head=base.lm_head,
    )


def layer_class_names(model: nn.Module) -> list[str]:
    """Class names of the ViT's and the LLM's transformer layers (FSDP2 shards each such layer as one unit)."""
    parts = model_parts(model)
    return sorted({type(layer).__name__ for layer in (*parts.vision_layers, *parts.llm_layers)})


def llm_attention(layer: nn.Module) -> nn.Module:
    """The attention block of LLM decoder layer `layer`: the first of its blocks to run, and the only one the decoder
    layer passes its keyword arguments on to (every LLM family the kit supports)."""
    return layer.self_attn


def part_modules(part: Part) -> tuple[str, ...]:
    """The module names (from the model root) that make up `part`, e.g. for PEFT's modules_to_save or for keeping a
    part out of quantisation."""
    return tuple(prefix.rstrip(".") for prefix in PART_PREFIXES[part])


def vision_layer_module(index: int) -> str:
    """The module name of ViT encoder layer `index` (matched by suffix under PEFT's wrappers)."""
    return f"vision_tower.encoder.layer.{index}"


def _strip_wrappers(name: str) -> str:
    """`base_model.model.model.vision_tower.x` (PEFT) or `module.model...` (DDP) -> `model.vision_tower.x`."""
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def part_of(parameter_name: str) -> Part:
    """Which part a parameter or module name belongs to."""
    name = _strip_wrappers(parameter_name)
    for part, prefixes in PART_PREFIXES.items():
        if name.startswith(prefixes):
            return part
    raise KeyError(f"{parameter_name!r} belongs to no InternVL part (vision, projector, llm)")


def vision_layer_index(parameter_name: str) -> int | None:
    """Index of the ViT encoder layer a parameter lives in; None for embeddings and the final norm."""
    match = re.search(r"vision_tower\.encoder\.layer\.(\d+)\.", parameter_name)
    return int(match.group(1)) if match else None


def llm_layer_index(name: str) -> int | None:
    """Index of the LLM decoder layer a parameter or module lives in; None outside the decoder layers."""
    match = re.search(r"language_model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def vision_depth(parameter_name: str, num_layers: int) -> int:
    """Depth of a ViT parameter for layer-wise LR decay: 0 for the embeddings (patch, position, CLS), i + 1 for encoder
    layer i (0-based), `num_layers` for anything after the last layer (a final norm)."""
    index = vision_layer_index(parameter_name)
    if index is not None:
        return index + 1
    return 0 if "vision_tower.embeddings." in parameter_name else num_layers


def llm_family(model: nn.Module) -> str:
    return unwrap(model).config.text_config.model_type


def llm_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The LoRA-able linear layers of the model's LLM family (docs/design/trainability.md)."""
    family = llm_family(model)
    if family not in LLM_LORA_TARGETS:
        raise ConfigError(
            f"no LoRA targets known for LLM family {family!r} (known: {', '.join(LLM_LORA_TARGETS)}); train the LLM "
            "fully (llm.mode=full) or freeze it"
        )
    return LLM_LORA_TARGETS[family]


def _llm_alternative(model: nn.Module, targets: tuple[str, ...], layers: tuple[int, ...]) -> str:
    """The LLM's part of a target regex: `targets` (default: the family's) in decoder `layers` (default: all)."""
    known = llm_lora_targets(model)
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise ConfigError(f"adapter.llm_targets: {unknown} are not LoRA targets of this LLM; choose from {list(known)}")
    num_layers = unwrap(model).config.text_config.num_hidden_layers
    outside = sorted(index for index in layers if not 0 <= index < num_layers)
    if outside:
        raise ConfigError(f"adapter.llm_layers: {outside} outside this LLM's layers 0..{num_layers - 1}")
    names = "|".join(targets or known)
    if not layers:
        return rf"{re.escape(PART_PREFIXES['llm'][0])}(?:.*\.)?(?:{names})"
    indices = "|".join(str(index) for index in sorted(set(layers)))
    head, tail = _LLM_LAYER.split("{i}")
    return rf"{re.escape(head)}(?:{indices}){re.escape(tail)}(?:.*\.)?(?:{names})"


def lora_target_regex(
    model: nn.Module,
    parts: tuple[Part, ...] = ("llm",),
    llm_targets: tuple[str, ...] = (),
    llm_layers: tuple[int, ...] = (),
) -> str:
    """A PEFT `target_modules` regex for the LoRA-able linear layers of `parts`, never leaking across parts.

    `llm_targets` narrows the LLM's linear layers (default: its family's full set), `llm_layers` its decoder layers
    (indices, default: all). The lm_head is never a target: only modules under the first prefix of each part.
    """
    alternatives = []
    for part in parts:
        if part == "llm":
            alternatives.append(_llm_alternative(model, tuple(llm_targets), tuple(llm_layers)))
            continue
        names = {"vision": VISION_LORA_TARGETS, "projector": PROJECTOR_LORA_TARGETS}[part]
        alternatives.append(rf"{re.escape(PART_PREFIXES[part][0])}(?:.*\.)?(?:{'|'.join(names)})")
    return rf"^(?:{'|'.join(alternatives)})$"
