"""Forward passes that stop before the vocabulary projection.

A [B, T, V] logits tensor is the largest activation of LLM training: 8,192 tokens x 151,674 vocabulary entries are
2.5 GB in bf16 and 5 GB once cast to fp32 for the cross-entropy, more than the whole LoRA-adapted 2B model. The losses
(`ivl.losses.token_logps`) project only the supervised positions, a chunk at a time; this module gives them the
LLM's final hidden states instead of logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ivl.model.parts import model_parts


def final_hidden_states(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The LLM's last (normed) hidden states [B, T, H] for the forward arguments `inputs`.

    `model` itself is called, so DDP / FSDP / PEFT wrappers and forward hooks (partial LoRA) do their work; the hidden
    states are caught on their way out of the LLM by a forward hook, and `logits_to_keep=1` makes the model's own
    lm_head project a single position ([B, 1, V]) instead of all of them. A hook rather than `output_hidden_states`:
    that option would also keep every layer's output alive, which costs L x [B, T, H] under `no_grad`.
    """
    caught: list[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple, output: Any) -> None:
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model_parts(model).llm.register_forward_hook(catch)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"expected one pass through the LLM, saw {len(caught)}")
    return caught[0]


def causal_inputs(inputs: dict[str, Any], attention_mask: torch.Tensor) -> dict[str, Any]:
    """The forward arguments `inputs` without their 2-D attention mask when the batch is right-padded (judged from
    `attention_mask` [B, T], the collated host copy; a mask elsewhere is kept: reading it would wait for the device).

    In a causal LLM a real token attends only to the tokens before it, and right padding comes after every real token
    of its row; the position ids are 0..T-1 with or without the mask. So the hidden states of the real tokens, and any
    loss and gradient built from them, are those of the masked forward; only the padding positions' own (unused)
    outputs change. Without the mask, transformers' sdpa path takes the `is_causal` kernel: no [B, 1, T, T] mask, no
    score above the diagonal computed, key / value heads not copied per query head (measured on one CPU thread, one
    [2, 4, 760, 64] GQA layer: 27 ms forward + backward against 41 ms with the mask, outputs bitwise equal).
    """
    if attention_mask.device.type != "cpu" or bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        return inputs  # a mask on the device, or a row with a real token after a padded one (left padding)
    return {key: value for key, value in inputs.items() if key != "attention_mask"}


def output_layer(model: nn.Module) -> nn.Module:
    """The vocabulary projection (lm_head) inside any wrapper."""
    return model_parts(model).lm_head
