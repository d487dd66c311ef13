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


def _checkpointing(config) -> list[Change]:
    modes = config.modes()
    overrides = [] if config.llm.gradient_checkpointing else ["llm.gradient_checkpointing=true"]
    vision_trains = modes["vision"] != "frozen" or config.vision.unfreeze_last_layers
    if vision_trains and not config.vision.gradient_checkpointing:
        overrides.append("vision.gradient_checkpointing=true")
    return [(overrides, "gradient checkpointing: ~30% slower steps, same result")] if overrides else []


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
    return "\n".join(lines)
