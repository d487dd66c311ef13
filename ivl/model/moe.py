"""Mixture-of-experts LLMs (Qwen3-MoE, GPT-OSS): the routers' load-balancing loss while training.

    with router_logits_caught(model) as router_logits:       # [tokens, experts] per MoE layer, this forward pass
        hidden = final_hidden_states(model, inputs)
    aux = load_balancing_loss(model, router_logits, attention_mask)
    loss = loss + router_aux_coefficient(model) * aux

The model's own loss adds `router_aux_loss_coef` x transformers' `load_balancing_loss_func` (Switch Transformer:
experts x sum over experts of token share x mean router probability) when asked for router logits. The kit's losses
never call the model's loss (they stop before the vocabulary projection, `ivl.model.forward`), so the auxiliary
term is added here, with the model's own function and coefficient. The logits are caught by forward hooks on the
routers for the duration of one forward pass: a gradient-checkpointing replay in the backward pass runs after the
hooks are gone, so each router counts once.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ivl.model.parts import llm_family, llm_routers, unwrap


def is_moe(model: nn.Module) -> bool:
    return bool(llm_routers(model))


def router_aux_coefficient(model: nn.Module) -> float:
    """The weight the model's own loss gives the load-balancing term (its config's `router_aux_loss_coef`)."""
    return float(unwrap(model).config.text_config.router_aux_loss_coef)


@contextmanager
def router_logits_caught(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """The router logits [tokens, experts] of each MoE layer, appended as the forward passes inside the block run;
    stays empty for a dense LLM or when not `enabled`."""
    caught: list[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple, output: Any) -> None:
        caught.append(output[0])  # (logits, top-k scores, top-k indices) for every family the kit supports

    handles = [router.register_forward_hook(catch) for router in llm_routers(model)] if enabled else []
    try:
        yield caught
    finally:
        for handle in handles:
            handle.remove()


def load_balancing_loss(
    model: nn.Module, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The family's own load-balancing loss (unweighted) over `router_logits`; `attention_mask` [B, T] leaves padding
    out (its size must be the logits' token count, else every token counts, as in a packed batch)."""
    family = llm_family(model)
    text = unwrap(model).config.text_config
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    num_experts = getattr(text, "num_experts", None) or text.num_local_experts
    if attention_mask is not None and attention_mask.numel() != router_logits[0].shape[0]:
        attention_mask = None
    top_k = text.num_experts_per_tok
    return modeling.load_balancing_loss_func(tuple(router_logits), num_experts, top_k, attention_mask)
