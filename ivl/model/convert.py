"""Original InternVL checkpoints (remote-code `InternVLChatModel`) <-> HF-native `InternVLForConditionalGeneration`.

    convert_checkpoint("InternVL2_5-8B", "InternVL2_5-8B-hf", to="hf")      # streams tensor by tensor
    convert_checkpoint("my-run/merged", "my-run/merged-original", to="original")
    model = load_original_model(Path("InternVL2_5-8B"), torch.bfloat16)  # converted in memory

Weights (docs/design/original_checkpoints.md): the ViT's fused `attn.qkv` is split into q/k/v (q | k | v rows),
`ls1/ls2` become `lambda_1/2`, `mlp1.{0,1,3}` the projector; an InternLM2 LLM becomes LLaMA-structured (its interleaved
`wqkv` de-interleaved, see `split_wqkv`); Qwen2, LLaMA, Phi-3 and InternVL3.5's Qwen3, Qwen3-MoE and GPT-OSS originals
are transformers' own classes, so their LLM is only moved (Phi-3 keeps its fused `qkv_proj` / `gate_up_proj`, as
transformers' Phi-3 does; Qwen3-MoE's experts stay one tensor per expert in both checkpoint layouts and are fused only
inside a model, see `fuse_experts`). A model whose lm_head is tied to its embeddings stays tied: both layouts then hold
the matrix once. Names are matched by role: this module holds the original names, `ivl.model.parts.HF_NAMES` the
HF-native ones. Configs: `ivl.model.convert_config`; tokenizers: `ivl.model.convert_tokenizer`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from accelerate import init_empty_weights
from torch import Tensor
from transformers import InternVLConfig, InternVLForConditionalGeneration

from ivl.config import ConfigError
from ivl.errors import ModelLoadError
from ivl.model.convert_config import (
    hf_config_from_original,
    hf_family,
    image_processor_config,
    llm_family,
    original_config_from_hf,
    read_checkpoint_config,
    tiling_from_image_processor,
    write_json,
)
from ivl.model.convert_tokenizer import (
    IMAGE_CONTEXT_TOKEN,
    save_hf_tokenizer,
    save_original_tokenizer,
    save_original_tokenizer_from,
    token_id_from_files,
)
from ivl.model.parts import HF_NAMES, attention_implementation, loaded_name, saved_name
from ivl.model.processor import IMAGE_PROCESSOR_FILE, PROCESSOR_FILE, processor_config
from ivl.model.tensor_io import TensorGroup, TensorSource, open_tensors, tensors_in_memory, write_shards

Format = Literal["hf", "original"]
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Files copied as they are: the original's remote code (its config's auto_map points at it) and generation defaults.
CARRIED_FILES = ("*.py", "generation_config.json")

# Original names by role (`{i}`: layer index); the roles are those of `parts.HF_NAMES`.
_VIT_LAYER = "vision_model.encoder.layers.{i}."
_LLM_LAYER = "language_model.model.layers.{i}."
ORIGINAL_NAMES: dict[str, str] = {
    "vision.cls": "vision_model.embeddings.class_embedding",
    "vision.position": "vision_model.embeddings.position_embedding",
    "vision.patch": "vision_model.embeddings.patch_embedding",
    "vision.qkv": _VIT_LAYER + "attn.qkv",
    "vision.q_norm": _VIT_LAYER + "attn.q_norm",
    "vision.k_norm": _VIT_LAYER + "attn.k_norm",
    "vision.out": _VIT_LAYER + "attn.proj",
    "vision.fc1": _VIT_LAYER + "mlp.fc1",
    "vision.fc2": _VIT_LAYER + "mlp.fc2",
    "vision.norm1": _VIT_LAYER + "norm1",
    "vision.norm2": _VIT_LAYER + "norm2",
    "vision.scale1": _VIT_LAYER + "ls1",
    "vision.scale2": _VIT_LAYER + "ls2",
    "projector.norm": "mlp1.0",
    "projector.linear1": "mlp1.1",
    "projector.linear2": "mlp1.3",
}
# Qwen2 / LLaMA / Phi-3 originals hold transformers' own CausalLM as `language_model`: the HF-native LLM names under
# that CausalLM's prefixes.
_TRANSFORMERS_LLM = {
    role: name.replace("model.language_model.", "language_model.model.")
    for role, name in HF_NAMES.items()
    if role.startswith("llm.")
} | {"lm_head": "language_model.lm_head"}
_INTERNLM2_LLM = {
    "llm.embed": "language_model.model.tok_embeddings",
    "llm.wqkv": _LLM_LAYER + "attention.wqkv",
    "llm.o": _LLM_LAYER + "attention.wo",
    "llm.gate": _LLM_LAYER + "feed_forward.w1",
    "llm.up": _LLM_LAYER + "feed_forward.w3",
    "llm.down": _LLM_LAYER + "feed_forward.w2",
    "llm.input_norm": _LLM_LAYER + "attention_norm",
    "llm.post_norm": _LLM_LAYER + "ffn_norm",
    "llm.norm": "language_model.model.norm",
    "lm_head": "language_model.output",
}
# Experts by layout: Qwen3-MoE checkpoints (original and HF-native alike) hold one gate / up / down per expert,
# GPT-OSS's hold them fused (3-D, with biases). Each family accepts its own layout only.
_PER_EXPERT_ROLES = ("llm.expert_gate", "llm.expert_up", "llm.expert_down")
_FUSED_EXPERT_ROLES = ("llm.experts_gate_up", "llm.experts_gate_up_bias", "llm.experts_down", "llm.experts_down_bias")
_DENSE_LLM = {role: name for role, name in _TRANSFORMERS_LLM.items() if role not in _FUSED_EXPERT_ROLES}
_DENSE_LLM = {role: name for role, name in _DENSE_LLM.items() if role not in _PER_EXPERT_ROLES}
ORIGINAL_LLM_NAMES = dict.fromkeys(("qwen2", "llama", "phi3", "qwen3"), _DENSE_LLM) | {
    "internlm2": _INTERNLM2_LLM,
    "qwen3_moe": {role: name for role, name in _TRANSFORMERS_LLM.items() if role not in _FUSED_EXPERT_ROLES},
    "gpt_oss": {role: name for role, name in _TRANSFORMERS_LLM.items() if role not in _PER_EXPERT_ROLES},
}
# transformers' Qwen3-MoE keeps its experts fused in the model (`gate_up_proj` [E, 2I, H]: each expert's gate rows
# then its up rows; `down_proj` [E, H, I]) and splits them per expert when it saves (its conversion mapping, reverted):
# models built here from checkpoint tensors are fused, models written from memory are split, as transformers does.
PER_EXPERT_FAMILIES = ("qwen3_moe",)


def split_wqkv(wqkv: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """InternLM2's interleaved `wqkv` -> LLaMA's q, k, v (weight or bias).

    wqkv: [num_kv_heads * (group + 2) * head_dim, *rest], group = num_heads // num_kv_heads, laid out per kv head as
    [q_1 .. q_group, k, v] blocks of head_dim rows (InternLM2: `(h gs d) -> h gs d`, gs = group + 2).
    Returns q [num_heads * head_dim, *rest] (query head j = kv head j // group, as LLaMA's repeat_kv pairs them),
    k and v [num_kv_heads * head_dim, *rest].
    """
    group = num_heads // num_kv_heads
    rest = wqkv.shape[1:]
    blocks = wqkv.reshape(num_kv_heads, group + 2, -1, *rest)  # [kv heads, group + 2, head_dim, *rest]
    head_dim = blocks.shape[2]
    q = blocks[:, :group].reshape(num_heads * head_dim, *rest)
    k = blocks[:, group].reshape(num_kv_heads * head_dim, *rest)
    v = blocks[:, group + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def join_wqkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """LLaMA q, k, v -> InternLM2's interleaved `wqkv` (the inverse of `split_wqkv`)."""
    group = num_heads // num_kv_heads
    rest = q.shape[1:]
    blocks = torch.cat(
        [
            q.reshape(num_kv_heads, group, -1, *rest),
            k.reshape(num_kv_heads, 1, -1, *rest),
            v.reshape(num_kv_heads, 1, -1, *rest),
        ],
        dim=1,
    )  # [kv heads, group + 2, head_dim, *rest]
    return blocks.reshape(-1, *rest)


def _same(tensor: Tensor) -> tuple[Tensor]:
    return (tensor,)


def _split_qkv(qkv: Tensor) -> tuple[Tensor, ...]:
    # InternViT's attn.qkv: [3 * hidden, *rest], q | k | v (`reshape(B, N, 3, heads, head_dim)` in its forward).
    return tuple(qkv.chunk(3, dim=0))


def _join_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
    return (torch.cat([q, k, v], dim=0),)


@dataclass(frozen=True)
class Rule:
    """Roles on each side and the tensor functions between them (a rename, or a fused <-> split layout)."""

    original: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[..., tuple[Tensor, ...]]
    to_original: Callable[..., tuple[Tensor, ...]]

    def sides(self, to: Format) -> tuple[tuple[str, ...], tuple[str, ...], Callable[..., tuple[Tensor, ...]]]:
        """(source roles, target roles, transform) for converting into layout `to`."""
        if to == "hf":
            return self.original, self.hf, self.to_hf
        return self.hf, self.original, self.to_original


def conversion_rules(family: str, num_heads: int, num_kv_heads: int) -> list[Rule]:
    """The rules for an InternVL whose LLM is `family` (num_heads / num_kv_heads: its attention shape)."""
    original_names = {**ORIGINAL_NAMES, **ORIGINAL_LLM_NAMES[family]}
    rules = [Rule((role,), (role,), _same, _same) for role in original_names if role in HF_NAMES]
    rules.append(Rule(("vision.qkv",), ("vision.q", "vision.k", "vision.v"), _split_qkv, _join_qkv))
    if family == "internlm2":
        heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads)

        def join(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
            return (join_wqkv(q, k, v, **heads),)

        rules.append(Rule(("llm.wqkv",), ("llm.q", "llm.k", "llm.v"), partial(split_wqkv, **heads), join))
    return rules


def _pattern(template: str) -> re.Pattern:
    """`a.{i}.b.{e}.c` -> a regex for its parameters: `a.<digits>.b.<digits>.c` plus `.weight` / `.bias` or nothing
    (bare parameters); the layer index is group `i`, the expert index group `e`."""
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(rf"^{body}(?P<suffix>\.weight|\.bias|)$")


def fuse_experts(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-expert tensors (HF-native names) -> the fused expert parameters of transformers' Qwen3-MoE."""
    per_expert = {role: _pattern(HF_NAMES[role]) for role in _PER_EXPERT_ROLES}
    fused: dict[str, dict[str, dict[int, Tensor]]] = {}  # layer -> role -> expert -> [rows, columns]
    result = {}
    for name, tensor in state.items():
        found = next(((role, match) for role, pattern in per_expert.items() if (match := pattern.match(name))), None)
        if found is None:
            result[name] = tensor
            continue
        role, match = found
        fused.setdefault(match.group("i"), {}).setdefault(role, {})[int(match.group("e"))] = tensor
    for layer, roles in fused.items():
        gate, up, down = ([roles[role][e] for e in sorted(roles[role])] for role in _PER_EXPERT_ROLES)
        name = HF_NAMES["llm.experts_gate_up"].format(i=layer)
        result[name] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)  # [E, 2I, H]
        result[HF_NAMES["llm.experts_down"].format(i=layer)] = torch.stack(down)  # [E, H, I]
    return result


def split_experts(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `fuse_experts`: fused Qwen3-MoE expert parameters -> one gate / up / down weight per expert."""
    gate_up, down = _pattern(HF_NAMES["llm.experts_gate_up"]), _pattern(HF_NAMES["llm.experts_down"])
    result = {}
    for name, tensor in state.items():
        if match := gate_up.match(name):
            gates, ups = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                result[HF_NAMES["llm.expert_gate"].format(i=match.group("i"), e=e) + ".weight"] = gates[e]
                result[HF_NAMES["llm.expert_up"].format(i=match.group("i"), e=e) + ".weight"] = ups[e]
        elif match := down.match(name):
            for e in range(tensor.shape[0]):
                result[HF_NAMES["llm.expert_down"].format(i=match.group("i"), e=e) + ".weight"] = tensor[e]
        else:
            result[name] = tensor
    return result


def plan_conversion(keys: list[str], rules: list[Rule], to: Format, family: str) -> list[TensorGroup]:
    """Tensor groups turning every key of one layout into the other's; unknown or incomplete keys are errors."""
    original_names = {**ORIGINAL_NAMES, **ORIGINAL_LLM_NAMES[family]}
    source_names, target_names = (original_names, HF_NAMES) if to == "hf" else (HF_NAMES, original_names)
    matchers = [(_pattern(source_names[role]), rule) for rule in rules for role in rule.sides(to)[0]]
    present, seen, groups = set(keys), set(), []
    for key in keys:
        found = next(((match, rule) for pattern, rule in matchers if (match := pattern.match(key))), None)
        if found is None and key.endswith(("_blocks", "_scales")):
            raise ModelLoadError(
                f"{key}: MXFP4-quantised experts (gpt-oss's release format); dequantise them first, e.g. load with "
                "transformers' Mxfp4Config(dequantize=True) and save_pretrained"
            )
        if found is None:
            layout = "original" if to == "hf" else "HF-native"
            raise ModelLoadError(f"{key}: not a parameter of a {layout} InternVL with a {family} LLM")
        match, rule = found
        layer, expert, suffix = match.groupdict().get("i"), match.groupdict().get("e"), match.group("suffix")
        if (rule, layer, expert, suffix) in seen:
            continue  # the group was made from an earlier key (q made it; k and v belong to it)
        seen.add((rule, layer, expert, suffix))
        source_roles, target_roles, transform = rule.sides(to)
        sources = tuple(source_names[role].format(i=layer, e=expert) + suffix for role in source_roles)
        missing = [name for name in sources if name not in present]
        if missing:
            raise ModelLoadError(f"{key} comes with {', '.join(missing)}, which the checkpoint lacks")
        targets = tuple(target_names[role].format(i=layer, e=expert) + suffix for role in target_roles)
        groups.append(TensorGroup(sources, targets, transform))
    return groups


def checkpoint_format(path: Path) -> Format:
    """`original` for an InternVLChatModel checkpoint (remote code, `llm_config`), `hf` otherwise."""
    config = read_checkpoint_config(path)
    is_original = "llm_config" in config or "InternVLChatModel" in config.get("architectures", [])
    return "original" if is_original or config.get("model_type") == "internvl_chat" else "hf"


def is_original_checkpoint(path: Path) -> bool:
    """Whether local directory `path` holds an original-format checkpoint (False for anything else)."""
    return (path / "config.json").is_file() and checkpoint_format(path) == "original"


def _image_token_id(path: Path) -> int:
    token_id = token_id_from_files(path, IMAGE_CONTEXT_TOKEN)
    if token_id is None:
        raise ModelLoadError(f"{path}: the tokenizer files do not define {IMAGE_CONTEXT_TOKEN}; not an InternVL model")
    return token_id


def _hf_groups(source: TensorSource, config: InternVLConfig, family: str, to: Format) -> list[TensorGroup]:
    text = config.text_config
    rules = conversion_rules(family, text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads)
    keys = source.keys()
    lm_heads = {HF_NAMES["lm_head"] + ".weight", ORIGINAL_LLM_NAMES[family]["lm_head"] + ".weight"}
    groups = plan_conversion(keys, rules, to, family)
    if config.tie_word_embeddings:
        # Tied on both sides: each checkpoint holds the matrix once, as the embeddings (a stray lm_head is the same
        # matrix to the tied model, which never reads it).
        return [group for group in groups if not lm_heads & set(group.targets)]
    if to == "original" and HF_NAMES["lm_head"] + ".weight" not in keys:
        # An untied original has its own lm_head even where an HF checkpoint left it out.
        embed = HF_NAMES["llm.embed"] + ".weight"
        groups.append(TensorGroup((embed,), (ORIGINAL_LLM_NAMES[family]["lm_head"] + ".weight",), _same))
    return groups


def file_state(state: dict[str, Tensor], config: InternVLConfig) -> dict[str, Tensor]:
    """A model's state dict as transformers writes it to a checkpoint: a tied lm_head left out, Qwen3-MoE experts
    one tensor per expert."""
    if config.tie_word_embeddings:
        state = {name: tensor for name, tensor in state.items() if name != HF_NAMES["lm_head"] + ".weight"}
    return split_experts(state) if config.text_config.model_type in PER_EXPERT_FAMILIES else state


def _check_hf_keys(config: InternVLConfig, names: set[str], source: str) -> None:
    """The converted names must be exactly the HF checkpoint's: nothing missing, nothing left over."""
    with torch.device("meta"):
        expected = set(file_state(InternVLForConditionalGeneration(config).state_dict(), config))
    if names != expected:
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        raise ModelLoadError(
            f"{source}: converting gives a state dict that does not match the HF model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the checkpoint and its config.json disagree"
        )


def hf_model_config(path: Path) -> InternVLConfig:
    """The HF-native config of original checkpoint `path` (no weights read)."""
    original = read_checkpoint_config(path)
    return hf_config_from_original(original, _image_token_id(path), str(path))


def _to_hf_plan(src: Path, allow_pickle: bool):
    """(original config, HF config, source, groups giving the HF model's parameter names)."""
    original = read_checkpoint_config(src)
    family = llm_family(original)
    config = hf_config_from_original(original, _image_token_id(src), str(src))
    source = open_tensors(src, allow_pickle)
    groups = _hf_groups(source, config, family, "hf")
    _check_hf_keys(config, {name for group in groups for name in group.targets}, str(src))
    return original, config, source, groups


def _as_saved(groups: list[TensorGroup]) -> list[TensorGroup]:
    """The same groups writing the names transformers' own `save_pretrained` uses."""
    return [replace(group, targets=tuple(saved_name(name) for name in group.targets)) for group in groups]


def load_original_model(path: Path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """An original-format checkpoint as an HF-native model, converted in memory (no converted copy on disk)."""
    _, config, source, groups = _to_hf_plan(path, allow_pickle=False)
    config.dtype = dtype
    # Parameters on the meta device until the converted tensors are assigned; buffers (rotary frequencies) are real.
    with init_empty_weights(include_buffers=False):
        attention = attention_implementation(config, attn_implementation)
        model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attention)
    state = {}
    for group in groups:
        for name, tensor in group.run(source).items():
            tensor = tensor.to(dtype)
            state[name] = tensor.clone() if tensor._base is not None else tensor  # no parameter views of another's data
    if config.text_config.model_type in PER_EXPERT_FAMILIES:
        state = fuse_experts(state)
    if config.tie_word_embeddings:
        state[HF_NAMES["lm_head"] + ".weight"] = state[HF_NAMES["llm.embed"] + ".weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assigning gave the lm_head its own Parameter object: make it the embeddings' again
    return model.eval()


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: Format,
    allow_pickle: bool = False,
    llm_arch: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Convert checkpoint directory `src` into layout `to` at `dst`; returns notes for the user (may be empty)."""
    src, dst = Path(src), Path(dst)
    found = checkpoint_format(src)
    if found == to:
        raise ConfigError(f"{src} is already an {to} checkpoint (config.json says so); nothing to convert")
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"{dst} exists and is not empty; give a new directory")
    dst.mkdir(parents=True, exist_ok=True)
    if to == "hf":
        original, config, source, groups = _to_hf_plan(src, allow_pickle)
        write_shards(dst, source, _as_saved(groups), max_shard_bytes)
        config.dtype = source.dtype()
        config.save_pretrained(dst)
        write_json(dst / IMAGE_PROCESSOR_FILE, image_processor_config(original))
        write_json(dst / PROCESSOR_FILE, processor_config(config))
        notes = save_hf_tokenizer(src, dst, original.get("template"))
    else:
        try:
            config = InternVLConfig.from_pretrained(src)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{src}: not an HF-native InternVL checkpoint ({error})") from error
        source = open_tensors(src, allow_pickle).renamed(loaded_name)
        tiling = tiling_from_image_processor(src)
        save_original(source, config, None, dst, llm_arch, tiling, max_shard_bytes)
        notes = save_original_tokenizer_from(src, dst)
    _carry_files(src, dst)
    return notes + (remote_code_notes(dst) if to == "original" else [])


def remote_code_notes(dst: Path, src: Path | None = None) -> list[str]:
    """Carry an original checkpoint `src`'s remote code (and generation defaults) into the original checkpoint `dst`;
    a one-line note when `dst` still has no code to load it with."""
    if src is not None:
        _carry_files(src, dst)
    if any(dst.glob("modeling_*.py")):
        return []
    return [f"{dst} names remote code in its auto_map (modeling_internvl_chat.py, ...): copy those files from the "
            "original checkpoint or the InternVL repository to load it with trust_remote_code"]  # fmt: skip


def save_original(
    source: TensorSource,
    config: InternVLConfig,
    tokenizer,
    dst: Path,
    llm_arch: str | None = None,
    tiling: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write HF-native weights (`source`) with their config (and `tokenizer`, if given) as an original
    InternVLChatModel checkpoint."""
    family = hf_family(config, llm_arch)
    groups = _hf_groups(source, config, family, "original")
    dst.mkdir(parents=True, exist_ok=True)
    write_shards(dst, source, groups, max_shard_bytes)
    write_json(dst / "config.json", original_config_from_hf(config, family, tiling or {}, source.dtype()))
    if tokenizer is not None:
        save_original_tokenizer(tokenizer, dst)
    return dst


def save_model_as_original(model, tokenizer, dst: str | Path, llm_arch: str | None = None) -> Path:
    """Write an in-memory HF-native model as an original checkpoint (`ivl merge --format original`)."""
    state = file_state({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, model.config)
    return save_original(tensors_in_memory(state), model.config, tokenizer, Path(dst), llm_arch)


def _carry_files(src: Path, dst: Path) -> None:
    for pattern in CARRIED_FILES:
        for file in src.glob(pattern):
            if not (dst / file.name).exists():
                shutil.copy2(file, dst / file.name)
