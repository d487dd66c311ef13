"""`ivl sft CONFIG --dry-run`: what a run would train and roughly what memory it needs, without weights or data.

The model is built on the meta device from its config (a preset, a local checkpoint's config.json, a hub config) and
goes through the recipe's own `apply_trainability` and `optimizer_groups`, so the parameter groups and learning rates
shown are the ones training would use. The memory estimate is deliberately simple: parameters by dtype (NF4 for the
LLM's linear weights and fused MoE expert weights under QLoRA), fp32 gradients of the trainable ones and the optimizer's
states. Activations are not included (they depend on sequence length, batch size and checkpointing): `ivl plan` adds
them.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import InternVLForConditionalGeneration

from ivl.finetune.sft import SFTConfig, optimizer_groups
from ivl.model.adapters import apply_trainability, trainable_report
from ivl.model.load import load_model_config, resolve_dtype
from ivl.model.partial_lora import partial_lora_of
from ivl.model.parts import PARTS, llm_expert_parameters, llm_layer_index, model_parts, part_of

GIB = 2**30
# NF4 with double quantisation: 4-bit values, one 8-bit absmax per 64 values, one fp32 scale per 256 absmaxes.
NF4_BITS_PER_VALUE = 4 + 8 / 64 + 32 / (64 * 256)
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes' 8-bit optimizers keep tensors smaller than this in 32-bit states
ACTIVATIONS_NOTE = (
    "activations are not included: they grow with sequence length (tiles x tokens per tile) and batch size and "
    "shrink with gradient checkpointing; `ivl plan CONFIG` predicts the whole peak"
)


def meta_model(config: SFTConfig, model_config: Any, dtype: torch.dtype) -> tuple[nn.Module, set[int]]:
    """The configured model (`model_config`, in `dtype`) on the meta device, its trainability applied; also the ids
    of the parameters a QLoRA run would hold in NF4 (the LLM's linear weights, as `ivl.model.quantize` leaves ViT,
    projector and lm_head). `ivl plan` counts its parameters through this too."""
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(model_config).to(dtype)
    quantized = set()
    if config.adapter.qlora:  # and a mixture-of-experts LLM's fused expert weights, stored in NF4 the same way
        llm = model_parts(model).llm
        quantized = {id(module.weight) for module in llm.modules() if isinstance(module, nn.Linear)}
        quantized |= {id(parameter) for parameter in llm_expert_parameters(model)}
    model = apply_trainability(model, config.modes(), config.vision, config.adapter)
    return model, quantized


def _layout(model: nn.Module, config: SFTConfig, modes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per part: its mode and, for LoRA, rank, alpha, the adapted linear layers (and LLM layers), partial or not."""
    layout = {part: {"mode": modes[part]} for part in PARTS}
    found: dict[str, tuple[set[str], set[int]]] = {part: (set(), set()) for part in PARTS}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            targets, layers = found[part_of(name)]
            if hasattr(module, "parameter_name"):  # LoRA on a parameter (fused MoE experts): "experts.down_proj"
                owner = name.replace(".base_layer", "").rsplit(".", 1)[-1]
                targets.add(f"{owner}.{module.parameter_name}")
            else:
                targets.add(name.rsplit(".", 1)[-1])
            index = llm_layer_index(name)
            if index is not None:
                layers.add(index)
    for part, (targets, layers) in found.items():
        if modes[part] != "lora":
            continue
        entry = layout[part]
        entry.update(r=config.adapter.r, alpha=config.adapter.alpha, targets=sorted(targets))
        if part == "llm":
            entry.update(
                layers=sorted(layers),
                num_layers=len(model_parts(model).llm_layers),
                partial=partial_lora_of(model) is not None,
                quantized="nf4" if config.adapter.qlora else None,
            )
        else:
            entry["partial"] = False
    return layout


def _groups(model: nn.Module, config: SFTConfig) -> list[dict[str, Any]]:
    num_layers = len(model_parts(model).vision_layers)
    rows = []
    for group in optimizer_groups(model, config):
        depth = group["depth"]
        # Depth 0 is the embeddings; depth L holds the last layer and anything after it (both train at lr).
        name = {None: group["part"], 0: "vision embeddings"}.get(depth, f"vision layer {depth}/{num_layers}")
        rows.append(
            {
                "name": name + (" (no wd)" if group["no_weight_decay"] else ""),
                "part": group["part"],
                "depth": depth,
                "decay_power": None if depth is None else num_layers - depth,
                "parameters": sum(p.numel() for p in group["params"]),
                "lr": group["lr"],
                "weight_decay": group["weight_decay"],
            }
        )
    return rows


def parameter_memory(model: nn.Module, quantized: set[int], optimizer: str) -> dict[str, Any]:
    """Weights by dtype (NF4 where quantised), fp32 gradients of the trainable ones, the optimizer's states."""
    weights = sum(
        p.numel() * NF4_BITS_PER_VALUE / 8 if id(p) in quantized else p.numel() * p.element_size()
        for p in model.parameters()
    )
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    gradients = sum(trainable) * 4  # trainable weights are fp32 masters, their gradients fp32
    if optimizer == "adamw":
        states = sum(trainable) * 8  # exp_avg + exp_avg_sq in fp32
    else:
        states = sum(n * 2 if n >= BNB_8BIT_MIN_SIZE else n * 8 for n in trainable)
    return {
        "weights_gib": weights / GIB,
        "gradients_gib": gradients / GIB,
        "optimizer_states_gib": states / GIB,
        "total_gib": (weights + gradients + states) / GIB,
        "optimizer": optimizer,
        "activations_included": False,
        "note": ACTIVATIONS_NOTE,
    }


def dry_run(config: SFTConfig) -> dict[str, Any]:
    """The run's parameter groups, adapter layout and memory estimate; nothing is loaded beyond the model config."""
    dtype = resolve_dtype(config.model.dtype)
    model, quantized = meta_model(config, load_model_config(config.model), dtype)
    modes = config.modes()
    report = {row["part"]: row for row in trainable_report(model, modes)}
    return {
        "model": config.model.name_or_path,
        "dtype": str(dtype).removeprefix("torch."),
        "parts": {part: {"trainable": row["trainable"], "total": row["total"]} for part, row in report.items()},
        "layout": _layout(model, config, modes),
        "groups": _groups(model, config),
        "memory": parameter_memory(model, quantized, config.optim.optimizer),
    }


def _describe_part(part: str, entry: dict[str, Any]) -> str:
    if entry["mode"] != "lora":
        return f"  {part:<10} {entry['mode']}"
    kind = "partial_lora" if entry.get("partial") else "lora"
    text = f"  {part:<10} {kind:<12} r {entry['r']}, alpha {entry['alpha']}, targets {','.join(entry['targets'])}"
    if "layers" in entry:
        every = entry["layers"] == list(range(entry["num_layers"]))
        text += f", layers {'all ' + str(entry['num_layers']) if every else ','.join(map(str, entry['layers']))}"
    return text + (" on an NF4 base" if entry.get("quantized") else "")


def format_dry_run(result: dict[str, Any]) -> str:
    memory = result["memory"]
    lines = [f"dry run of {result['model']} ({result['dtype']}): nothing loaded, nothing trained", "adapter layout"]
    lines += [_describe_part(part, entry) for part, entry in result["layout"].items()]
    lines += ["parameter groups (peak learning rates; the schedule scales all of them alike)"]
    lines += [f"  {'group':<26} {'parameters':>12} {'lr':>10} {'decay^k':>8} {'weight decay':>13}"]
    for group in result["groups"]:
        power = "" if group["decay_power"] is None else str(group["decay_power"])
        lines.append(
            f"  {group['name']:<26} {group['parameters']:>12,} {group['lr']:>10.3e} {power:>8} "
            f"{group['weight_decay']:>13g}"
        )
    lines += [
        "memory estimate (parameters only)",
        f"  weights            {memory['weights_gib']:>8.3f} GiB",
        f"  gradients          {memory['gradients_gib']:>8.3f} GiB  (fp32, trainable only)",
        f"  optimizer states   {memory['optimizer_states_gib']:>8.3f} GiB  ({memory['optimizer']})",
        f"  total              {memory['total_gib']:>8.3f} GiB",
        f"  {memory['note']}",
    ]
    return "\n".join(lines)
