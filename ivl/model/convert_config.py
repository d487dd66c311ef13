"""Configs of original InternVL checkpoints (`InternVLChatConfig`: `vision_config`, `llm_config`, `template`, ...)
<-> HF-native `InternVLConfig` (+ the `GotOcr2ImageProcessor` config that holds the dynamic-tiling settings).

Going to HF, the whole original config is also kept in the HF config under `internvl_chat_config`: HF has no place
for some of it (`template`, `use_thumbnail`, `auto_map`, `ps_version`, the LLM's remote-code fields), and keeping it
lets the way back restore the original exactly. Coming back, every field the HF side also holds (sizes, token ids,
rope, image size, select layer, dtype, tiling) is taken from the HF side, so a model changed after conversion (merged
LoRA, resized vocabulary) is described correctly; only the fields HF cannot hold come from the kept copy, or defaults.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, InternVLConfig, PreTrainedConfig

from ivl.model.load import ModelLoadError
from ivl.model.presets import tokens_per_tile_of
from ivl.model.processor import hf_image_processor_config

ORIGINAL_CONFIG_KEY = "internvl_chat_config"
LLM_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
    "InternLM2ForCausalLM": "internlm2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}
ARCHITECTURE_OF = {family: name for name, family in LLM_ARCHITECTURES.items()}
# Every family but InternLM2 is transformers' own CausalLM inside the original, so its text model type is its name.
HF_TEXT_MODEL_TYPE = {family: family for family in ARCHITECTURE_OF} | {"internlm2": "llama"}
# The conversation template an original config names, when the HF side does not say (InternVL's own choices;
# InternVL3.5 keeps InternVL2.5's).
DEFAULT_TEMPLATES = {"qwen2": "internvl2_5", "internlm2": "internlm2-chat", "phi3": "phi3-chat", "llama": "Hermes-2"}
DEFAULT_TEMPLATES |= dict.fromkeys(("qwen3", "qwen3_moe", "gpt_oss"), "internvl2_5")
ROPE_TYPE_FAMILIES = ("qwen3", "qwen3_moe", "gpt_oss")
# GPT-OSS alternates sliding-window and full attention by `layer_types`: part of the model, so it travels.
LAYER_TYPES_FAMILIES = ("gpt_oss",)
# Fields a config class gained after our transformers floor (5.17), which travel by name where present: GPT-OSS's
# clamped SwiGLU limit and gain (published configs write `swiglu_limit`) are constants in 5.17's model (7.0, 1.702),
# and its config keeps them as plain attributes, outside the class's signature.
LATER_FIELDS = {"gpt_oss": {"swiglu_limit", "swiglu_alpha"}}
# InternLM2-based InternVLs use <IMG_CONTEXT> = 92546 (docs/design/original_checkpoints.md): how a LLaMA-structured HF
# config is told apart.
INTERNLM2_IMAGE_TOKEN_ID = 92546
# InternVisionConfig field -> InternVLVisionConfig field (image_size is handled apart: force_image_size wins).
VISION_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "norm_type": "norm_type",
    "num_channels": "num_channels",
    "initializer_range": "initializer_range",
    "attention_dropout": "attention_dropout",
    "patch_size": "patch_size",
    "qkv_bias": "attention_bias",
    "qk_normalization": "use_qk_norm",
    "dropout": "projection_dropout",  # InternViT applies it after attn.proj only
    "initializer_factor": "layer_scale_init_value",  # ls1 / ls2 start value
}
# InternLM2Config field -> LlamaConfig field (rope_theta / rope_scaling are handled apart).
INTERNLM2_FIELDS = {
    name: name
    for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    )
} | {"bias": "attention_bias"}  # fmt: skip
# Tiling settings of an original config <-> GotOcr2ImageProcessor fields.
TILING_FIELDS = {
    "dynamic_image_size": "crop_to_patches",
    "min_dynamic_patch": "min_patches",
    "max_dynamic_patch": "max_patches",
}


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError as error:
        raise ModelLoadError(f"{path}: no config.json, so not a model checkpoint directory") from error
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_file}: not valid JSON ({error})") from error


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def llm_family(original: dict[str, Any]) -> str:
    """The LLM family of an original config: qwen2 | llama | phi3 | internlm2 | qwen3 | qwen3_moe | gpt_oss."""
    architectures = original.get("llm_config", {}).get("architectures") or [None]
    if architectures[0] not in LLM_ARCHITECTURES:
        raise ModelLoadError(
            f"llm_config.architectures = {architectures}: an InternVL with this LLM cannot be converted "
            f"(known: {', '.join(LLM_ARCHITECTURES)})"
        )
    return LLM_ARCHITECTURES[architectures[0]]


def hf_family(config: InternVLConfig, llm_arch: str | None = None) -> str:
    """The original LLM family for an HF config: `llm_arch` when given, else the kept original's, else from the text
    model type (LLaMA-structured with InternLM2's image token id: InternLM2)."""
    kept = getattr(config, ORIGINAL_CONFIG_KEY, None)
    if llm_arch is not None:
        return llm_arch
    if kept is not None:
        return llm_family(kept)
    model_type = config.text_config.model_type
    if model_type == "llama":
        return "internlm2" if config.image_token_id == INTERNLM2_IMAGE_TOKEN_ID else "llama"
    if model_type not in ARCHITECTURE_OF:
        raise ModelLoadError(f"an InternVL with a {model_type!r} LLM has no original layout to convert to")
    return model_type


def _config_fields(config_class: type) -> set[str]:
    """A config class's own fields (not the generic PreTrainedConfig ones), rope given apart, plus `head_dim`: the
    attention of every family reads it when given, and Qwen3-MoE's (not in its signature) needs it, since
    hidden / heads is not its head size (Qwen3-30B-A3B: 2048 / 32 heads of 128)."""
    own = set(inspect.signature(config_class.__init__).parameters)
    generic = set(inspect.signature(PreTrainedConfig.__init__).parameters)
    return own - generic - {"self", "kwargs", "rope_parameters", "rope_theta", "rope_scaling", "layer_types"} | {
        "head_dim"
    }


def _own_fields(text: PreTrainedConfig, family: str) -> dict[str, Any]:
    """The fields of text config `text` under the names its class takes (`to_dict` writes an aliased field under
    its alias: Qwen3-MoE's `num_experts` as `num_local_experts`)."""
    fields = _config_fields(type(text)) | LATER_FIELDS.get(family, set())
    aliases = {alias: name for name, alias in type(text).attribute_map.items()}
    named = {(name if name in fields else aliases.get(name, name)): value for name, value in text.to_dict().items()}
    return {name: value for name, value in named.items() if name in fields}


def _text_config(llm: dict[str, Any], family: str) -> dict[str, Any]:
    model_type = HF_TEXT_MODEL_TYPE[family]
    if family == "internlm2":
        text = {hf: llm[name] for name, hf in INTERNLM2_FIELDS.items() if name in llm}
    else:
        fields = _config_fields(type(AutoConfig.for_model(model_type))) | LATER_FIELDS.get(family, set())
        text = {name: value for name, value in llm.items() if name in fields}
    scaling = llm.get("rope_scaling")
    if family == "phi3" and scaling and "original_max_position_embeddings" in llm:
        # transformers' longrope reads it from the rope parameters, Phi-3 configs keep it at the top level.
        scaling = {"original_max_position_embeddings": llm["original_max_position_embeddings"], **scaling}
    if family in LAYER_TYPES_FAMILIES and "layer_types" in llm:
        text["layer_types"] = list(llm["layer_types"])
    rope = {"rope_theta": llm["rope_theta"]} if "rope_theta" in llm else {}
    # A copy: transformers adds its own keys to the rope parameters it is given.
    return {"model_type": model_type, **text, **rope, **({"rope_scaling": copy.deepcopy(scaling)} if scaling else {})}


def check_convertible(original: dict[str, Any], source: str) -> None:
    """Refuse what the HF-native model cannot express, naming the field."""
    if original.get("ps_version", "v1") != "v2":
        raise ModelLoadError(
            f"{source}: ps_version {original.get('ps_version', 'v1')!r}; transformers' InternVL implements pixel "
            "shuffle v2 only (v1 leaves the token grid transposed), so this checkpoint cannot be converted"
        )
    if original.get("use_backbone_lora") or original.get("use_llm_lora"):
        raise ModelLoadError(f"{source}: use_backbone_lora / use_llm_lora set: merge its LoRA weights first")
    vision = original["vision_config"]
    forced = original.get("force_image_size")
    if forced and forced != vision["image_size"]:
        raise ModelLoadError(
            f"{source}: force_image_size {forced} != vision_config.image_size {vision['image_size']}; the original "
            "code interpolates position embeddings at run time, the HF model does not"
        )


def hf_config_from_original(original: dict[str, Any], image_token_id: int, source: str) -> InternVLConfig:
    """The HF-native config of an original InternVLChatConfig dict (which is kept inside it)."""
    check_convertible(original, source)
    original = copy.deepcopy(original)  # kept inside the HF config, so no later edit of the caller's dict reaches it
    family = llm_family(original)
    vision = original["vision_config"]
    hf_vision = {hf: vision[name] for name, hf in VISION_FIELDS.items() if name in vision}
    image_size = original.get("force_image_size") or vision["image_size"]
    hf_vision.update(image_size=image_size, use_mean_pooling=True, use_absolute_position_embeddings=True)
    return InternVLConfig(
        vision_config=hf_vision,
        text_config=_text_config(original["llm_config"], family),
        image_token_id=image_token_id,
        downsample_ratio=original.get("downsample_ratio", 0.5),
        vision_feature_layer=original.get("select_layer", -1),
        image_seq_length=tokens_per_tile_of(image_size, vision["patch_size"], original.get("downsample_ratio", 0.5)),
        # The original's LLM ties its lm_head to the embeddings when its config says so (its checkpoint then holds the
        # matrix once); the HF model ties by this top-level flag.
        tie_word_embeddings=bool(original["llm_config"].get("tie_word_embeddings", False)),
        architectures=["InternVLForConditionalGeneration"],
        **{ORIGINAL_CONFIG_KEY: original},
    )


def tiling_of_original(original: dict[str, Any]) -> dict[str, Any]:
    """An original config's tiling under the HF image processor's names (crop_to_patches, min / max_patches)."""
    defaults = {"dynamic_image_size": False, "min_dynamic_patch": 1, "max_dynamic_patch": 6}  # InternVLChatConfig's
    return {hf: original.get(name, defaults[name]) for name, hf in TILING_FIELDS.items()}


def image_processor_config(original: dict[str, Any]) -> dict[str, Any]:
    """`preprocessor_config.json` for the HF checkpoint of an original one: its tile size and tiling."""
    size = original.get("force_image_size") or original["vision_config"]["image_size"]
    return hf_image_processor_config(size, **tiling_of_original(original))


def tiling_from_image_processor(path: Path) -> dict[str, Any]:
    """Tiling settings (original field names) from an HF checkpoint's `preprocessor_config.json`, if it has one."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return {}
    processor = json.loads(file.read_text())
    return {name: processor[hf] for name, hf in TILING_FIELDS.items() if hf in processor}


def _side(size: int | list[int] | tuple[int, ...]) -> int:
    return size[0] if isinstance(size, (list, tuple)) else size


def _rope_scaling(scaling: dict[str, Any] | None, family: str) -> dict[str, Any] | None:
    """Rope scaling as original configs write it: `type` (not transformers 5's `rope_type`; InternVL3.5's LLMs, whose
    code is transformers 4.5x's, read `rope_type`), Phi-3's `su`, and none of the keys transformers adds to its rope
    parameters. Also the canonical form two configs are compared in."""
    if not scaling:
        return None
    scaling = {key: value for key, value in scaling.items() if key != "rope_theta"}
    kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
    scaling.pop("rope_type", None)
    if scaling.get("partial_rotary_factor") == 1.0:
        del scaling["partial_rotary_factor"]
    if family == "phi3":
        scaling.pop("original_max_position_embeddings", None)  # Phi-3 keeps it at the top level
        kind = "su" if kind == "longrope" else kind  # InternVL's Phi-3 code knows `su` (= longrope) and `yarn`
    key = "rope_type" if family in ROPE_TYPE_FAMILIES else "type"
    return {key: kind, **scaling} if kind != "default" or scaling else None


def _llm_config(config: InternVLConfig, family: str) -> dict[str, Any]:
    text = config.text_config
    if family == "internlm2":
        derived = {name: getattr(text, hf) for name, hf in INTERNLM2_FIELDS.items()}
    else:
        derived = _own_fields(text, family)
    if family in LAYER_TYPES_FAMILIES:
        derived["layer_types"] = list(text.layer_types)
    rope = dict(text.rope_parameters or {})
    derived.update(
        tie_word_embeddings=bool(config.tie_word_embeddings),  # the HF model ties by the top-level flag
        rope_theta=rope.get("rope_theta"),
        rope_scaling=_rope_scaling(rope, family),
        architectures=[ARCHITECTURE_OF[family]],
        model_type=family,
    )
    return derived


def _default_original(family: str) -> dict[str, Any]:
    """What an original config holds that an HF config cannot say, as InternVL writes it."""
    llm: dict[str, Any] = {}
    if family == "internlm2":
        llm = {
            "attn_implementation": "eager",
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            },
        }
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "template": DEFAULT_TEMPLATES[family],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "ps_version": "v2",
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "drop_path_rate": 0.0,
            "use_flash_attn": True,
        },
        "llm_config": llm,
    }


def _overlay(target: dict[str, Any], derived: dict[str, Any], only_existing: bool) -> None:
    for key, value in derived.items():
        if not only_existing or key in target:
            target[key] = value


def original_config_from_hf(
    config: InternVLConfig, family: str, tiling: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """The original InternVLChatConfig dict of an HF config (see the module docstring for what comes from where)."""
    if not isinstance(config.vision_feature_layer, int):
        raise ModelLoadError(f"vision_feature_layer {config.vision_feature_layer}: the original takes one layer only")
    kept = copy.deepcopy(getattr(config, ORIGINAL_CONFIG_KEY, None))
    result = kept if kept is not None else _default_original(family)
    only_existing = kept is not None
    llm_kept = kept is not None and llm_family(kept) == family
    if not llm_kept:
        result["llm_config"] = _default_original(family)["llm_config"]  # another LLM layout: its fields do not apply
    text, vision = config.text_config, config.vision_config
    image_size = _side(vision.image_size)
    top = {
        "downsample_ratio": config.downsample_ratio,
        "select_layer": config.vision_feature_layer,
        "hidden_size": text.hidden_size,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **tiling,
    }
    if kept is None or kept.get("force_image_size") is not None:
        top["force_image_size"] = image_size
    _overlay(result, top, only_existing)
    derived_vision = {name: getattr(vision, hf) for name, hf in VISION_FIELDS.items()}
    derived_vision.update(image_size=image_size, patch_size=_side(vision.patch_size))
    _overlay(result["vision_config"], derived_vision, only_existing)
    llm = result["llm_config"]
    derived_llm = _llm_config(config, family)
    if "rope_scaling" in llm and _rope_scaling(llm["rope_scaling"], family) == derived_llm["rope_scaling"]:
        derived_llm.pop("rope_scaling")  # the same scaling: keep the original's spelling of it
    _overlay(llm, derived_llm, llm_kept)
    return result
