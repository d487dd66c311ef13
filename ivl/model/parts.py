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
    # Qwen3 (InternVL3.5): LLaMA-structured; its QK-norm weights (q_norm, k_norm) are RMSNorms, never targeted.
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # Qwen3-MoE: attention, and the dense MLP of any `mlp_only_layers` (none in the released models).
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # GPT-OSS: attention only among linear layers (its attention sinks are per-head parameters, left alone).
    "gpt_oss": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
# Mixture-of-experts LLMs keep their experts as fused 3-D parameters ([experts, out, in] or [experts, in, out]), which
# PEFT adapts through `target_parameters` (one low-rank pair per expert). Names a user gives in adapter.llm_targets ->
# the parameter path inside a decoder layer. The router trains only when asked for ("router").
LLM_EXPERT_TARGETS: dict[str, dict[str, str]] = {
    "qwen3_moe": {
        "experts.gate_up_proj": "mlp.experts.gate_up_proj",
        "experts.down_proj": "mlp.experts.down_proj",
        "router": "mlp.gate.weight",
    },
    "gpt_oss": {
        "experts.gate_up_proj": "mlp.experts.gate_up_proj",
        "experts.down_proj": "mlp.experts.down_proj",
        "router": "mlp.router.weight",
    },
}
DEFAULT_EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
# Attention backends an LLM family cannot run, and what its LLM runs instead (the ViT keeps the one asked for).
# GPT-OSS adds a learned per-head sink logit to every softmax, which sdpa and flash-attention-2 do not have:
# it runs eager attention, the implementation that applies the sinks on every device.
LLM_ATTENTION_FALLBACK: dict[str, dict[str, str]] = {
    "gpt_oss": {"sdpa": "eager", "flash_attention_2": "eager"},
}
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
PROJECTOR_LORA_TARGETS = ("linear_1", "linear_2")

# HF-native module (or bare parameter) names by role, `{i}` a layer index, `{e}` an expert index, for converting
# checkpoints written in other layouts (`ivl.model.convert` holds the original InternVLChatModel names for the same
# roles). The LLM roles cover LLaMA-structured families (Qwen2, LLaMA, InternLM2 once converted), Phi-3's fused
# `qkv_proj` / `gate_up_proj`, Qwen3's QK-norm, Qwen3-MoE's router (`mlp.gate`) and experts, which checkpoint files
# hold one tensor per expert and the model as fused 3-D parameters, and GPT-OSS's attention sinks, router and fused
# experts with biases (fused in files too).
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
    "llm.q_norm": _LLM_LAYER + "self_attn.q_norm",
    "llm.k_norm": _LLM_LAYER + "self_attn.k_norm",
    "llm.sinks": _LLM_LAYER + "self_attn.sinks",
    "llm.gate": _LLM_LAYER + "mlp.gate_proj",
    "llm.up": _LLM_LAYER + "mlp.up_proj",
    "llm.gate_up": _LLM_LAYER + "mlp.gate_up_proj",
    "llm.down": _LLM_LAYER + "mlp.down_proj",
    "llm.router_gate": _LLM_LAYER + "mlp.gate",
    "llm.router": _LLM_LAYER + "mlp.router",
    "llm.expert_gate": _LLM_LAYER + "mlp.experts.{e}.gate_proj",
    "llm.expert_up": _LLM_LAYER + "mlp.experts.{e}.up_proj",
    "llm.expert_down": _LLM_LAYER + "mlp.experts.{e}.down_proj",
    "llm.experts_gate_up": _LLM_LAYER + "mlp.experts.gate_up_proj",
    "llm.experts_gate_up_bias": _LLM_LAYER + "mlp.experts.gate_up_proj_bias",
    "llm.experts_down": _LLM_LAYER + "mlp.experts.down_proj",
    "llm.experts_down_bias": _LLM_LAYER + "mlp.experts.down_proj_bias",
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


def attention_implementation(model_config, requested: str) -> str | dict[str, str]:
    """transformers' `attn_implementation` argument for an `InternVLConfig`: `requested` everywhere, unless the LLM's
    family cannot run it (GPT-OSS's attention sinks, LLM_ATTENTION_FALLBACK): then one per sub-config."""
    llm = LLM_ATTENTION_FALLBACK.get(model_config.text_config.model_type, {}).get(requested, requested)
    if llm == requested:
        return requested
    return {"": requested, "vision_config": requested, "text_config": llm}


def llm_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The LoRA-able linear layers of the model's LLM family (docs/design/trainability.md)."""
    family = llm_family(model)
    if family not in LLM_LORA_TARGETS:
        raise ConfigError(
            f"no LoRA targets known for LLM family {family!r} (known: {', '.join(LLM_LORA_TARGETS)}); train the LLM "
            "fully (llm.mode=full) or freeze it"
        )
    return LLM_LORA_TARGETS[family]


def llm_expert_targets(model: nn.Module) -> dict[str, str]:
    """The model's expert / router LoRA targets (adapter.llm_targets name -> parameter path in a decoder layer); empty
    for a dense LLM."""
    return LLM_EXPERT_TARGETS.get(llm_family(model), {})


def llm_routers(model: nn.Module) -> list[nn.Module]:
    """The router (gate) of every mixture-of-experts decoder layer, in layer order; empty for a dense LLM."""
    router = LLM_EXPERT_TARGETS.get(llm_family(model), {}).get("router")
    if router is None:
        return []
    path = router.rpartition(".")[0]
    routers = []
    for layer in model_parts(model).llm_layers:
        try:  # a dense layer among MoE ones (Qwen3-MoE's mlp_only_layers) has none
            routers.append(layer.get_submodule(path))
        except AttributeError:
            continue
    return routers


def llm_expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The fused expert weights of every MoE decoder layer (not the router, not biases); empty for a dense LLM."""
    experts = LLM_EXPERT_TARGETS.get(llm_family(model), {})
    found = []
    for layer in model_parts(model).llm_layers:
        for target in DEFAULT_EXPERT_TARGETS:
            module_path, _, parameter = experts.get(target, "").rpartition(".")
            try:
                module = layer.get_submodule(module_path) if module_path else None
            except AttributeError:
                continue
            if module is not None and isinstance(getattr(module, parameter, None), nn.Parameter):
                found.append(getattr(module, parameter))
    return found


def _check_llm_choice(model: nn.Module, targets: tuple[str, ...], layers: tuple[int, ...]) -> None:
    known = (*llm_lora_targets(model), *llm_expert_targets(model))
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise ConfigError(f"adapter.llm_targets: {unknown} are not LoRA targets of this LLM; choose from {list(known)}")
    num_layers = unwrap(model).config.text_config.num_hidden_layers
    outside = sorted(index for index in layers if not 0 <= index < num_layers)
    if outside:
        raise ConfigError(f"adapter.llm_layers: {outside} outside this LLM's layers 0..{num_layers - 1}")


def lora_target_parameters(
    model: nn.Module, llm_targets: tuple[str, ...] = (), llm_layers: tuple[int, ...] = ()
) -> list[str]:
    """PEFT `target_parameters` for the LLM's experts (and router, when named in `llm_targets`): full parameter names
    of every decoder layer in `llm_layers` (default: all) that has them. Default targets: the experts' two fused
    projections. Empty for a dense LLM, or when `llm_targets` names only linear layers."""
    experts = llm_expert_targets(model)
    _check_llm_choice(model, llm_targets, llm_layers)
    chosen = [name for name in llm_targets if name in experts] if llm_targets else list(DEFAULT_EXPERT_TARGETS)
    if not experts or not chosen:
        return []
    layers = model_parts(model).llm_layers
    names = []
    for index in sorted(set(llm_layers)) if llm_layers else range(len(layers)):
        for target in chosen:
            module_path, _, parameter = experts[target].rpartition(".")
            try:  # a dense layer among MoE ones (Qwen3-MoE's mlp_only_layers) has no experts
                found = getattr(layers[index].get_submodule(module_path), parameter, None)
            except AttributeError:
                continue
            if isinstance(found, nn.Parameter):
                names.append(_LLM_LAYER.format(i=index) + experts[target])
    return names


def _llm_alternative(model: nn.Module, targets: tuple[str, ...], layers: tuple[int, ...]) -> str | None:
    """The LLM's part of a target regex: linear `targets` (default: the family's) in decoder `layers` (default: all);
    None when `targets` names only experts / the router."""
    known = llm_lora_targets(model)
    _check_llm_choice(model, targets, layers)
    linear = [name for name in targets if name in known] if targets else list(known)
    if not linear:
        return None
    names = "|".join(linear)
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
) -> str | None:
    """A PEFT `target_modules` regex for the LoRA-able linear layers of `parts`, never leaking across parts; None when
    no linear layer is targeted (only experts, see `lora_target_parameters`).

    `llm_targets` narrows the LLM's linear layers (default: its family's full set), `llm_layers` its decoder layers
    (indices, default: all). The lm_head is never a target: only modules under the first prefix of each part.
    """
    alternatives = []
    for part in parts:
        if part == "llm":
            llm = _llm_alternative(model, tuple(llm_targets), tuple(llm_layers))
            alternatives += [llm] if llm else []
            continue
        names = {"vision": VISION_LORA_TARGETS, "projector": PROJECTOR_LORA_TARGETS}[part]
        alternatives.append(rf"{re.escape(PART_PREFIXES[part][0])}(?:.*\.)?(?:{'|'.join(names)})")
    return rf"^(?:{'|'.join(alternatives)})$" if alternatives else None
