"""`ivl plan CONFIG`: the peak memory of a training run, itemised, before anything is loaded.

    plan = plan_run(load_recipe_config("configs/sft/internvl3_8b_qlora.yaml", []), device="cuda")
    plan.total_bytes, plan.items       # {"frozen weights": ..., "llm activations": ..., ...}

Parameters, gradients and optimizer states are counted exactly on a meta-device model built through the recipe's own
setup (`ivl.finetune.dry_run`). Activations are *modelled*: bytes per token per layer for each part and training mode,
measured once with autograd's saved-tensor hooks on this kit's models (how: see `ACTIVATION_TABLES` in
`ivl.plan_tables`) and scaled by the configured tokens, tiles, batch, checkpointing and attention. A few constants are
chosen and checked against measured peaks (`bench/plan_accuracy.py`, CPU) or *assumed* (CUDA only; no GPU has
measured them yet); each says which where it is defined. The recipe (SFT, MPO, distillation) is recognised from the
YAML's sections.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ivl.config import ConfigError
from ivl.plan_tables import (
    CPU_ALLOCATOR_SLACK,
    CPU_BASELINE_BYTES,
    CUDA_ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    GIB,
    LOSS_CHUNK_COPIES,
    llm_layer_bytes_per_token,
    vision_layer_bytes_per_token,
)

Device = Literal["cuda", "cpu"]
DEVICES: tuple[Device, ...] = ("cuda", "cpu")
RL_PROMPT_TEXT_TOKENS = 128  # an RL prompt's question and template tokens besides its image tokens (assumed)
ACTIVATION_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class Workload:
    """What one micro-batch puts through the model (after the config's data and loop sections)."""

    rows: int  # sequences per micro-batch (MPO: chosen + rejected rows, 2 per pair)
    tokens_per_row: int  # data.max_length, or the packing budget data.pack_max_tokens
    tiles: int  # image tiles through the ViT per micro-batch (MPO: once per pair)
    reference_pass: bool = False  # MPO: a no-grad forward of the reference policy while the policy's graph is alive


@dataclass
class Plan:
    """A predicted peak: named items in bytes, what they assume, and whether they fit `memory_gib`."""

    recipe: str
    model: str
    device: Device
    dtype: str
    workload: dict[str, Any]
    items: dict[str, float]
    memory_gib: float
    notes: list[str] = field(default_factory=list)
    proposals: list[dict[str, Any]] = field(default_factory=list)  # changes that make a run fit that does not
    speedups: list[dict[str, Any]] = field(default_factory=list)  # less checkpointing that still fits

    @property
    def total_bytes(self) -> float:
        return sum(self.items.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.memory_gib

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "workload": self.workload,
            "items_gib": {name: value / GIB for name, value in self.items.items()},
            "total_gib": self.total_gib,
            "memory_gib": self.memory_gib,
            "fits": self.fits,
            "notes": self.notes,
            "proposals": self.proposals,
            "speedups": self.speedups,
        }


def plan_dtype(dtype: str, device: Device) -> torch.dtype:
    """The model dtype a run would use on `device` (`auto`: bf16 on CUDA, fp32 on CPU, as `resolve_dtype` picks)."""
    from ivl.model.load import DTYPES

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[dtype]


def sft_workload(config, pair_rows: bool = False) -> Workload:
    """Rows, tokens and tiles of one micro-batch: every row at its budget (the worst case a run meets). Packed rows
    (`data.packing`) hold `data.pack_max_tokens` tokens and up to `data.pack_max_tiles` tiles; unpacked ones
    `data.max_length` tokens and `data.max_tiles` tiles (+ the thumbnail)."""
    data, batch = config.data, config.loop.batch_size
    if data.packing:
        tokens, tiles = data.pack_max_tokens, data.pack_max_tiles
    else:
        tokens = data.max_length
        tiles = data.max_tiles + (1 if data.use_thumbnail and data.max_tiles > 1 else 0)
    reference = pair_rows and not getattr(getattr(config, "mpo", None), "precompute_reference", False)
    return Workload(rows=batch * (2 if pair_rows else 1), tokens_per_row=tokens, tiles=batch * tiles,
                    reference_pass=reference)  # fmt: skip


def _parameter_items(config, model_config, dtype: torch.dtype) -> tuple[dict[str, float], Any]:
    """Weights (frozen in their dtype / NF4, trainable as fp32 masters), fp32 gradients and optimizer states, counted
    on the meta-device model `ivl sft --dry-run` builds; also returns that model."""
    from ivl.finetune.dry_run import meta_model, parameter_memory

    model, quantized = meta_model(config, model_config, dtype)
    memory = parameter_memory(model, quantized, config.optim.optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    items = {
        "frozen weights": memory["weights_gib"] * GIB - trainable,
        "trainable weights (fp32)": trainable,
        "gradients (fp32)": memory["gradients_gib"] * GIB,
        f"optimizer states ({config.optim.optimizer})": memory["optimizer_states_gib"] * GIB,
    }
    return items, model


def _lora_targets(model, part: str) -> int:
    from peft.tuners.lora import LoraLayer

    from ivl.model.parts import part_of

    return sum(1 for name, module in model.named_modules() if isinstance(module, LoraLayer) and part_of(name) == part)


def _vision_items(config, model_config, model, work: Workload, act_bytes: int) -> dict[str, float]:
    """ViT + projector activations. A frozen ViT with nothing trainable below it keeps no graph: only one layer's
    forward working set exists at a time."""
    from ivl.model.load import tile_size, tokens_per_tile

    vision, text = model_config.vision_config, model_config.text_config
    modes = config.modes()
    image_size = tile_size(model_config)
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    patches = (image_size // patch) ** 2 + 1  # + the CLS token
    tokens = work.tiles * patches
    layers = vision.num_hidden_layers
    trained_layers = layers if modes["vision"] != "frozen" else config.vision.unfreeze_last_layers
    targets_per_layer = _lora_targets(model, "vision") / layers if modes["vision"] == "lora" else 0
    mode = "lora" if modes["vision"] == "lora" else "full"
    per_layer = vision_layer_bytes_per_token(vision, mode, act_bytes, config.adapter.r, targets_per_layer,
                                             dropout=config.adapter.dropout > 0)  # fmt: skip
    checkpointed = checkpointed_layers(config.vision, layers, trained_layers)
    # A checkpointed layer keeps its input (and one at a time comes back whole in the backward pass); the others keep
    # their activations.
    inputs = checkpointed * tokens * vision.hidden_size * act_bytes
    saved = inputs + (trained_layers - checkpointed) * tokens * per_layer
    if checkpointed:
        saved += tokens * per_layer
    working = tokens * (2 * vision.hidden_size + vision.intermediate_size) * act_bytes  # one layer's forward
    image_tokens = work.tiles * tokens_per_tile(model_config)
    projector_trains = modes["projector"] != "frozen" or trained_layers > 0
    # Pixel-shuffled features (4 x ViT width), their LayerNorm, linear_1 and its GELU (both LLM width).
    projector = image_tokens * (8 * vision.hidden_size + 2 * text.hidden_size) * act_bytes if projector_trains else 0
    pixels = work.tiles * 3 * image_size**2 * (1 + act_bytes)  # uint8 tiles and their normalised copy
    return {"vision activations": max(saved, working), "projector activations": projector, "pixel values": pixels}


def checkpointed_layers(part, layers: int, trained: int) -> int:
    """How many of a part's last `trained` layers (of `layers`) recompute their activations: layers 0, k, 2k, ...
    with `gradient_checkpointing` and `checkpoint_every` k; none without."""
    if not part.gradient_checkpointing:
        return 0
    return sum(1 for index in range(layers - trained, layers) if index % part.checkpoint_every == 0)


def _moe(text) -> dict[str, int] | None:
    """A mixture-of-experts LLM's routing shape: experts, active experts per token, one expert's intermediate size;
    None for a dense LLM."""
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    if not experts:
        return None
    inter = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    return {"experts": experts, "active": text.num_experts_per_tok, "intermediate": inter}


def _as_dense(text, moe: dict[str, int]):
    """The LLM config as the activation tables see it: a token's MLP activations are those of its active experts."""
    dense = copy.copy(text)
    dense.intermediate_size = moe["active"] * moe["intermediate"]
    return dense


def _moe_items(config, text, moe, model, tokens: int, act_bytes: int, trains: bool) -> tuple[dict[str, float], float]:
    """MODELLED (not measured) extra memory of a mixture-of-experts LLM: (items, extra saved bytes per token per
    layer). Each expert keeps its own gathered copy of its tokens' inputs and weighted outputs (2 x active x H per
    token); the routers' logits of every layer live until the load-balancing loss, with its fp32 softmax. Expert
    weights in bf16 that carry LoRA are materialised per layer as W + the whole LoRA delta (PEFT's parameter LoRA),
    kept for the backward pass. NF4 experts are dequantised one expert at a time, as bitsandbytes' 4-bit matmul does
    for a linear layer, with the LoRA update computed on top (the 4-bit experts of QLoRA): one expert's weights."""
    layers, hidden = text.num_hidden_layers, text.hidden_size
    items = {}
    if trains:
        items["router logits + load-balancing loss"] = layers * tokens * moe["experts"] * (act_bytes + 4)
    per_expert = {"gate_up_proj": 2 * moe["intermediate"] * hidden, "down_proj": moe["intermediate"] * hidden}
    # PEFT's parameter-LoRA wrappers name the weight they adapt.
    adapted = {getattr(module, "parameter_name", None) for module in model.modules()} & set(per_expert)
    if config.adapter.qlora:
        items["dequantised nf4 expert (one at a time)"] = sum(per_expert.values()) * act_bytes
    elif adapted:
        checkpointed = checkpointed_layers(config.llm, layers, layers)
        kept = layers - checkpointed + (1 if checkpointed else 0)  # a checkpointed layer's come back one at a time
        values = moe["experts"] * sum(per_expert[key] for key in adapted)
        items["expert weights + LoRA delta (bf16 experts)"] = 2 * kept * values * act_bytes
    return items, 2 * moe["active"] * hidden * act_bytes


def _llm_items(config, model_config, model, work: Workload, act_bytes: int, device: Device,
               padding_mask: bool = True) -> dict[str, float]:  # fmt: skip
    """LLM activations (saved for backward), the backward pass's working set, logits and loss buffers; `padding_mask`:
    padded batches go through a [B, 1, T, T] mask (SFT's do not: `ivl.model.forward.causal_inputs`)."""
    from ivl.losses import LOGITS_CHUNK_ELEMENTS

    text = model_config.text_config
    modes = config.modes()
    moe = _moe(text)
    moe_items, moe_per_token = ({}, 0.0)
    if moe:
        moe_items, moe_per_token = _moe_items(config, text, moe, model, work.rows * work.tokens_per_row, act_bytes,
                                              modes["llm"] != "frozen")  # fmt: skip
        text = _as_dense(text, moe)
    tokens = work.rows * work.tokens_per_row
    layers = text.num_hidden_layers
    upstream_trains = modes["vision"] != "frozen" or modes["projector"] != "frozen"
    mode = {"lora": "lora", "full": "full"}.get(modes["llm"], "frozen" if upstream_trains else None)
    targets_per_layer = _lora_targets(model, "llm") / layers if modes["llm"] == "lora" else 0
    per_layer = llm_layer_bytes_per_token(text, mode or "frozen", act_bytes, config.adapter.r, targets_per_layer,
                                          dropout=config.adapter.dropout > 0)  # fmt: skip
    per_layer += moe_per_token
    hidden = tokens * text.hidden_size * act_bytes
    checkpointed = checkpointed_layers(config.llm, layers, layers) if mode else 0
    # A checkpointed layer keeps its input (its activations come back one layer at a time); the others keep theirs.
    saved = (checkpointed * hidden + (layers - checkpointed) * tokens * per_layer) if mode else 0.0
    items = {"llm activations": saved + 2 * hidden}  # + the embeddings and the final norm's output
    # Backward through one layer: its activation gradients (the widest is the MLP's) and, under checkpointing, the
    # recomputed layer's own activations.
    backward = tokens * (2 * text.hidden_size + 2 * text.intermediate_size) * act_bytes
    if checkpointed:
        backward += tokens * per_layer
    items["backward working set"] = backward
    items.update(moe_items)
    padded_mask = padding_mask and work.rows > 1 and not config.data.packing  # flash_attention_2 unpads instead
    if _attention(config, model_config) == "eager":  # [rows, heads, T, T] scores and probabilities in every layer
        items["attention scores (eager)"] = (
            (layers - checkpointed + (1 if checkpointed else 0) if mode else 1)
            * 2 * work.rows * text.num_attention_heads * work.tokens_per_row**2 * act_bytes
        )  # fmt: skip
    elif _packed_dense_mask(config, model_config):
        items["attention mask (packed rows)"] = work.rows * work.tokens_per_row**2  # [B, 1, T, T] bool, shared
    elif padded_mask and _attention(config, model_config) != "flash_attention_2":
        items["attention mask (padded batch)"] = work.rows * work.tokens_per_row**2  # [B, 1, T, T] bool, shared
    # The memory-lean loss projects one chunk of LOGITS_CHUNK_ELEMENTS // V supervised positions at a time (fp32).
    chunk_rows = min(LOGITS_CHUNK_ELEMENTS // text.vocab_size, tokens)
    items["logits + loss (one chunk)"] = LOSS_CHUNK_COPIES * chunk_rows * text.vocab_size * 4
    if config.adapter.qlora:  # a 4-bit linear dequantises its weight for each matmul (compute dtype)
        widest = text.hidden_size * max(text.intermediate_size, text.vocab_size if modes["llm"] == "full" else 0)
        items["dequantised nf4 weight"] = 2 * widest * act_bytes
    if work.reference_pass:  # no graph: one layer's working set, the final hidden states and a logits chunk
        items["reference forward (no grad)"] = hidden * 2 + tokens * text.intermediate_size * act_bytes * 2
    return items


def _attention(config, model_config) -> str:
    """The LLM's attention implementation (GPT-OSS runs eager when sdpa is asked for: its attention sinks)."""
    from ivl.model.parts import attention_implementation

    chosen = attention_implementation(model_config, config.model.attn_implementation)
    return chosen["text_config"] if isinstance(chosen, dict) else chosen


def plan_sft(config, device: Device, memory_gib: float, recipe: str = "sft", pair_rows: bool = False) -> Plan:
    """The peak of an SFT (or, with `pair_rows`, MPO) run of `config` on `device`."""
    dtype = plan_dtype(config.model.dtype, device)
    from ivl.model.load import model_config_of

    model_config = model_config_of(config.model)
    work = sft_workload(config, pair_rows)
    act_bytes = ACTIVATION_DTYPE_BYTES[dtype]
    items, model = _parameter_items(config, model_config, dtype)
    items.update(_vision_items(config, model_config, model, work, act_bytes))
    # SFT's right-padded batches run without their padding mask; MPO's forward still builds one.
    items.update(_llm_items(config, model_config, model, work, act_bytes, device, padding_mask=pair_rows))
    plan = Plan(recipe, config.model.name_or_path, device, str(dtype).removeprefix("torch."), vars(work), items,
                memory_gib)  # fmt: skip
    moe = _moe(model_config.text_config)
    if moe and config.adapter.qlora:
        plan.notes.append(_moe_load_note(model_config.text_config, moe, items["frozen weights"], act_bytes))
    dense = _packed_dense_mask(config, model_config)
    if dense:
        plan.notes.append(f"warning: data.packing: packed rows attend through a dense T x T mask: {dense}")
    return _finish(plan)


def _moe_load_note(text, moe: dict[str, int], weights: float, act_bytes: int) -> str:
    """How a 4-bit MoE model loads (`ivl.model.quantize_load`) and its peak: each layer's experts are read, fused on
    the device, stored in NF4 and freed before the next layer's, so the load holds the 4-bit weights plus one layer's
    fused gate_up stack about three times over (per-expert tensors, their stack, the concatenation; measured on CPU:
    0.31x of a tiny model's eight dense layers, i.e. 2.5 layers' gate_up)."""
    gate_up = moe["experts"] * 2 * moe["intermediate"] * text.hidden_size * act_bytes
    dense = text.num_hidden_layers * gate_up * 3 // 2  # gate_up + down_proj
    return (f"loading: MoE experts stored in NF4 layer by layer as they are read, peak about "
            f"{(weights + 3 * gate_up) / GIB:.1f} GiB (the 4-bit weights + {3 * gate_up / GIB:.1f} GiB while one "
            f"layer's experts are fused), never the {dense / GIB:.0f} GiB of dense experts")  # fmt: skip


def _packed_dense_mask(config, model_config) -> str | None:
    """Why this run's packed rows would attend through a dense [T, T] mask; None when it does not pack or its
    attention isolates the sub-samples itself."""
    if not getattr(config.data, "packing", False):
        return None
    from ivl.model.packed_attention import dense_mask_reason

    return dense_mask_reason(model_config.text_config.model_type, config.model.attn_implementation)


def plan_rl(config, device: Device, memory_gib: float) -> Plan:
    """The peak of an RL run (`ivl rl`): parameters, then the larger of its two phases, which never overlap.
    - generation: G answers per prompt of the micro-batch, with the KV cache of prompt + rl.max_new_tokens tokens;
    - the update: B x G rows of prompt + answer through the model with gradients (each row carries its prompt's tiles),
      plus the no-grad reference pass when loss.beta > 0."""
    from ivl.model.load import model_config_of, tokens_per_tile

    dtype = plan_dtype(config.model.dtype, device)
    model_config = model_config_of(config.model)
    act_bytes = ACTIVATION_DTYPE_BYTES[dtype]
    data, rl, batch = config.data, config.rl, config.loop.batch_size
    tiles = data.max_tiles + (1 if data.use_thumbnail and data.max_tiles > 1 else 0)
    prompt_tokens = min(data.max_length, tiles * tokens_per_tile(model_config) + RL_PROMPT_TEXT_TOKENS)
    rows = batch * rl.num_generations
    work = Workload(rows=rows, tokens_per_row=prompt_tokens + rl.max_new_tokens, tiles=rows * tiles,
                    reference_pass=config.loss.beta > 0)  # fmt: skip
    items, model = _parameter_items(config, model_config, dtype)
    update = _vision_items(config, model_config, model, work, act_bytes)
    update.update(_llm_items(config, model_config, model, work, act_bytes, device))
    text = model_config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_cache = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * rows * work.tokens_per_row * act_bytes
    # each step's next-token logits [rows, V] in fp32 and the sampler's sorted copy (top-p)
    generation = kv_cache + 3 * rows * text.vocab_size * 4
    items.update(update)
    items["generation beyond the update (KV cache)"] = max(0.0, generation - sum(update.values()))
    workload = {**vars(work), "kv_cache_gib": kv_cache / GIB, "prompt_tokens": prompt_tokens}
    plan = Plan("rl", config.model.name_or_path, device, str(dtype).removeprefix("torch."), workload, items, memory_gib)
    plan.notes.append(f"RL: prompts assumed at {tiles} tiles + {RL_PROMPT_TEXT_TOKENS} text tokens, answers at "
                      f"rl.max_new_tokens={rl.max_new_tokens}; generation needs {generation / GIB:.2f} GiB, the "
                      f"update {sum(update.values()) / GIB:.2f} GiB")  # fmt: skip
    return _finish(plan)


def _finish(plan: Plan) -> Plan:
    """Add the runtime's own memory: the CUDA context or the CPU process, and the allocator's slack on top of the
    live tensors."""
    live = sum(plan.items.values())
    if plan.device == "cuda":
        plan.items["allocator slack (assumed)"] = CUDA_ALLOCATOR_SLACK * live
        plan.items["cuda context (assumed)"] = CUDA_CONTEXT_BYTES
        plan.notes.append("CUDA figures are predictions: the context and allocator slack are assumed, not measured")
    else:
        plan.items["allocator slack (checked)"] = CPU_ALLOCATOR_SLACK * live
        plan.items["process baseline (measured)"] = CPU_BASELINE_BYTES
        plan.notes.append("CPU: peak RSS of the whole process (python + torch + transformers + the kit included)")
    return plan


def plan_distill(config, device: Device, memory_gib: float) -> Plan:
    """The peak of a vision-encoder distillation run: the teacher (online mode), the student with its adaptors, and
    both forward passes over one micro-batch of 448 px tiles."""
    from ivl.distill.plan import distill_items

    dtype = plan_dtype(config.teacher.dtype, device)
    items, workload = distill_items(config, dtype, ACTIVATION_DTYPE_BYTES[dtype])
    return _finish(Plan("distill", config.teacher.name_or_path, device, str(dtype).removeprefix("torch."),
                        workload, items, memory_gib))  # fmt: skip


def _loader(module: str, config_class: str, fills_train: bool = True):
    """A config loader for one recipe (imported when used: planning one recipe imports no other)."""

    def load(path: str | None, overrides: list[str]):
        from importlib import import_module

        from ivl.config import load_config

        options = getattr(import_module(module), config_class)
        return load_config(options, path, _with_train(path, overrides) if fills_train else overrides)

    return load


def _with_train(path: str | None, overrides: list[str]) -> list[str]:
    """Planning reads no data, so a config without `data.train` is planned as if it had one."""
    from ivl.config import read_yaml

    data = (read_yaml(path) if path else {}).get("data") or {}
    given = data.get("train") or any(item.startswith("data.train=") for item in overrides)
    return overrides if given else ["data.train=unused", *overrides]


# Recipe -> (config loader, planner). Recognised by the YAML's sections: `mpo:` is MPO, `rl:` RL, `teacher:`
# distillation.
RECIPES = {
    "sft": (_loader("ivl.finetune.options", "SFTConfig"), lambda config, device, gib: plan_sft(config, device, gib)),
    "mpo": (
        _loader("ivl.finetune.options", "MPOConfig"),
        lambda config, device, gib: plan_sft(config, device, gib, "mpo", pair_rows=True),
    ),
    "rl": (_loader("ivl.finetune.options", "RLConfig"), plan_rl),
    "distill": (_loader("ivl.distill.options", "DistillConfig", fills_train=False), plan_distill),
}


def recipe_of(path: str | None, overrides: list[str]) -> str:
    from ivl.config import read_yaml

    sections = set(read_yaml(path)) if path else set()
    sections |= {item.split(".", 1)[0] for item in overrides}
    if "mpo" in sections:
        return "mpo"
    return "rl" if "rl" in sections else "distill" if "teacher" in sections else "sft"


def plan_file(
    path: str | None, overrides: list[str], device: Device = "cuda", memory_gib: float = 24.0, speedups: bool = False
) -> Plan:
    """Plan the run `path` + `overrides` describe, with proposals that make it fit when it does not, and with
    `speedups` (what `ivl plan` asks for: one more plan per choice), the lighter checkpointing that still fits."""
    if device not in DEVICES:
        raise ConfigError(f"--device: {device!r} is not one of {', '.join(DEVICES)}")
    if not memory_gib > 0 or math.isinf(memory_gib):
        raise ConfigError(f"--memory-gib: give the card's memory in GiB (e.g. 24), got {memory_gib}")
    recipe = recipe_of(path, overrides)
    load, planner = RECIPES[recipe]
    config = load(path, overrides)
    plan = planner(config, device, memory_gib)
    if recipe != "distill":
        from ivl.plan_proposals import lighter_checkpointing, propose

        replan = lambda extra: planner(load(path, extra), device, memory_gib)  # noqa: E731
        if not plan.fits:
            plan.proposals = propose(config, overrides, replan)
        elif speedups:
            plan.speedups = lighter_checkpointing(config, overrides, replan)
    return plan
