"""What `ivl plan` suggests when a run does not fit, and how it prints a plan.

Each change is a list of dotted overrides the user can paste after the config; every proposal is re-planned with its
overrides applied (the same code path as a user's command line), so its predicted peak is the planner's own figure.
Changes are tried cheapest first: ones that cost only speed (gradient checkpointing, 8-bit optimizer states, a smaller
micro-batch with more accumulation), then QLoRA (a small quality cost), then less data per sample (fewer tiles,
shorter sequences).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ivl.plan_tables import GIB

Change = tuple[list[str], str]  # (overrides, what it costs)


def _llm_layers(config) -> int:
    from ivl.model.load import model_config_of

    return model_config_of(config.model).text_config.num_hidden_layers


def _recompute(checkpointed: int, layers: int) -> str:
    share = f"~{checkpointed / layers:.0%} of an LLM forward pass per step"
    return f"recomputes {checkpointed} of {layers} LLM layers ({share})"


def _checkpointing(config) -> list[Change]:
    """Checkpointing the LLM's every 4th, every 2nd, then every layer (with the ViT's when it trains): each recomputes
    its checkpointed layers' forward in the backward pass, so the mildest that fits costs the least time."""
    modes = config.modes()
    vision_trains = modes["vision"] != "frozen" or config.vision.unfreeze_last_layers
    vision = [] if not vision_trains or config.vision.gradient_checkpointing else ["vision.gradient_checkpointing=true"]
    if config.llm.gradient_checkpointing:
        return [(vision, "ViT gradient checkpointing: slower steps, same result")] if vision else []
    layers, changes = _llm_layers(config), []
    for every in (4, 2, 1):
        if every < layers:
            llm = ["llm.gradient_checkpointing=true", f"llm.checkpoint_every={every}"]
            why = f"gradient checkpointing: {_recompute(-(-layers // every), layers)}, same result"
            changes.append(([*llm, *vision], why))
    return changes


def _optimizer(config) -> list[Change]:
    if config.optim.optimizer != "adamw":
        return []
    return [(["optim.optimizer=adamw_8bit"], "8-bit AdamW states (bitsandbytes): near-identical training")]


def _batch(config) -> list[Change]:
    batch, accum, changes = config.loop.batch_size, config.loop.grad_accum, []
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        changes.append(([f"loop.batch_size={batch}", f"loop.grad_accum={accum}"],
                        "smaller micro-batch, same effective batch: slower steps"))  # fmt: skip
    return changes


def _qlora(config) -> list[Change]:
    if config.modes()["llm"] != "lora" or config.adapter.qlora:
        return []
    return [(["adapter.qlora=true"], "QLoRA: the LLM in 4-bit NF4, a small quality cost")]


def _tiles(config) -> list[Change]:
    data, changes = config.data, []
    key, tiles = ("data.pack_max_tiles", data.pack_max_tiles) if data.packing else (
        "data.max_tiles", data.max_tiles)  # fmt: skip
    while tiles > 1:
        tiles //= 2
        changes.append(([f"{key}={tiles}"], "fewer image tiles: less detail in large images"))
    return changes


def _length(config) -> list[Change]:
    data, changes = config.data, []
    key, tokens = ("data.pack_max_tokens", data.pack_max_tokens) if data.packing else (
        "data.max_length", data.max_length)  # fmt: skip
    while tokens > 1024:
        tokens //= 2
        changes.append(([f"{key}={tokens}"], "shorter sequences: longer samples are refused (data.on_error=skip)"))
    return changes


# Cheapest first; each gives its options from the mildest to the strongest.
CHANGES: list[Callable[[Any], list[Change]]] = [_checkpointing, _optimizer, _batch, _qlora, _tiles, _length]


def propose(config, overrides: list[str], replan: Callable[[list[str]], Any], limit: int = 4) -> list[dict[str, Any]]:
    """Changes that make the run fit: each kind's mildest option that fits alone, and, when none does, the cheapest
    combination (each kind's options in turn, cheapest kind first) that fits."""
    proposals = []
    for make in CHANGES:
        for change, why in make(config):
            plan = replan([*overrides, *change])
            if plan.fits:
                proposals.append({"changes": change, "why": why, "total_gib": plan.total_gib})
                break
    if proposals:
        return proposals[:limit]
    applied: list[str] = []
    for make in CHANGES:
        for change, _ in make(config):
            applied = [item for item in applied if item.split("=")[0] not in {c.split("=")[0] for c in change}]
            applied += change
            plan = replan([*overrides, *applied])
            if plan.fits:
                return [{"changes": applied, "why": "combined, cheapest first", "total_gib": plan.total_gib}]
    return []


def lighter_checkpointing(config, overrides: list[str], replan: Callable[[list[str]], Any]) -> list[dict[str, Any]]:
    """For a checkpointed LLM whose plan fits: checkpointing fewer layers (every 2k-th, 4k-th, ... layer for the
    configured k, then none) where it still fits, each re-planned. A checkpointed layer's forward runs again in the
    backward pass, so each choice saves that recompute for the layers it stops checkpointing."""
    llm = config.llm
    if not llm.gradient_checkpointing:
        return []
    layers = _llm_layers(config)
    now = -(-layers // llm.checkpoint_every)
    choices, every = [], 2 * llm.checkpoint_every
    while every < layers:
        choices.append(([f"llm.checkpoint_every={every}"], -(-layers // every)))
        every *= 2
    choices.append((["llm.gradient_checkpointing=false"], 0))
    found = []
    for change, checkpointed in choices:
        plan = replan([*overrides, *change])
        if plan.fits:
            why = f"{_recompute(checkpointed, layers)} instead of {now}" if checkpointed else (
                f"no recompute: saves the forward pass of the {now} checkpointed LLM layers per step")  # fmt: skip
            found.append({"changes": change, "why": why, "total_gib": plan.total_gib})
    return found


def format_plan(plan) -> str:
    work = plan.workload
    lines = [
        f"{plan.recipe} plan for {plan.model} on {plan.device} ({plan.dtype})",
        "  micro-batch: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in work.items()),
    ]
    lines += [f"  {name:<38} {value / GIB:>8.2f} GiB" for name, value in plan.items.items()]
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'predicted peak':<38} {plan.total_gib:>8.2f} GiB  -> {verdict} in {plan.memory_gib:g} GiB")
    lines += [f"  note: {note}" for note in plan.notes]
    if not plan.fits:
        lines.append("changes that make it fit (predicted peak):" if plan.proposals else "no proposed change fits")
        for proposal in plan.proposals:
            lines.append(f"  {' '.join(proposal['changes']):<60} {proposal['total_gib']:>7.2f} GiB  {proposal['why']}")
    if plan.speedups:
        lines.append("faster choices that still fit (predicted peak):")
        for choice in plan.speedups:
            lines.append(f"  {' '.join(choice['changes']):<60} {choice['total_gib']:>7.2f} GiB  {choice['why']}")
    return "\n".join(lines)
