"""Attention isolation for packed batches, per attention backend (docs/design/packing.md).

A packed row holds several sub-samples, each with position ids restarting at 0. `packed_forward_inputs` passes, on
top of those position ids, the sub-samples' cumulative lengths over the flattened batch (`cu_seq_lens_q/k`,
`max_length_q/k`: transformers' own names for variable-length attention), computed on the host from the collated
position ids. What each LLM attention backend does with them:

- `flash_attention_2` / `_3`: transformers' varlen kernels read the cumulative lengths directly (any batch size; from
  the position ids alone it would detect packing only in a batch of one row);
- `sdpa` (and GPT-OSS, whose attention sinks need eager maths): the LLM runs `ivl_packed_sdpa` / `ivl_packed_eager`
  (`use_packed_attention`), registered here: causal attention over each sub-sample on its own, so no T x T mask is
  built and no score outside a sub-sample is computed;
- `eager` as asked for, `flex_attention`, or an LLM family not checked here: transformers derives a block-diagonal
  mask from the restarting position ids (dense for eager, a block mask for flex); `dense_mask_reason` names the case.

Why a per-sub-sample loop rather than flex attention off CUDA: torch 2.13's flex attention has no backward pass on the
CPU (measured: "FlexAttention does not support backward on CPU", compiled or not), and transformers builds its block
mask with `torch.compile`. The loop costs one sdpa call per sub-sample and layer; its attention work is that of the
sub-samples run alone. The ViT is unaffected: it sees tiles one by one.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ivl.config import ConfigError

PACKED_SDPA = "ivl_packed_sdpa"
PACKED_EAGER = "ivl_packed_eager"
# LLM families whose attention goes through transformers' AttentionInterface with the layer's keyword arguments, and
# whose packed logits and gradients are tested equal to the sub-samples run alone (tests/test_packed_attention.py).
# InternLM2 checkpoints are converted to the LLaMA structure, so "llama" covers them.
PACKED_FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "gpt_oss", "llama", "phi3")


def check_packing_support() -> None:
    """ConfigError unless transformers isolates packed sub-samples from their position ids (the dense-mask path)."""
    masking = importlib.import_module("transformers.masking_utils")
    if not hasattr(masking, "find_packed_sequence_indices"):
        raise ConfigError(
            "data.packing: this transformers does not isolate packed sequences by position ids; install "
            "transformers >= 4.56 or set data.packing=false"
        )


def sequence_lengths(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative lengths [n + 1] int32 over the flattened rows, the longest sub-sample) of packed position ids
    [B, T]: a sub-sample starts wherever its position is 0 (every row starts one; the padding tail is its own)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    bounds = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def packed_forward_inputs(inputs: dict[str, Any], position_ids: torch.Tensor) -> dict[str, Any]:
    """The forward arguments of a packed batch: `inputs` without the 2-D attention mask (it would switch the
    position-id detection off), position ids [B, T] restarting per sub-sample, their cumulative lengths (from the
    host copy `position_ids`: no device sync), and no cache."""
    device = inputs["input_ids"].device
    bounds, longest = sequence_lengths(position_ids.cpu())
    bounds = bounds.to(device, non_blocking=True)
    kept = {key: value for key, value in inputs.items() if key != "attention_mask"}
    lengths = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}
    return {**kept, "position_ids": position_ids.to(device, non_blocking=True), "use_cache": False, **lengths}


def packed_implementation(family: str, requested: str, llm: str) -> str:
    """The LLM attention a packed run uses: `llm` is the implementation the family runs for `requested` (GPT-OSS
    runs eager where sdpa is asked for)."""
    if family not in PACKED_FAMILIES or requested != "sdpa":
        return llm
    return PACKED_SDPA if llm == "sdpa" else PACKED_EAGER


def dense_mask_reason(family: str, requested: str) -> str | None:
    """Why packed rows of this LLM would attend through a dense [T, T] mask, or None when they do not."""
    if requested == "eager":
        return "model.attn_implementation=eager builds a dense block-diagonal mask; sdpa attends per sub-sample"
    if requested == "sdpa" and family not in PACKED_FAMILIES:
        checked = ", ".join(PACKED_FAMILIES)
        return f"the {family} LLM family has no per-sub-sample attention in the kit (checked: {checked})"
    return None


def use_packed_attention(model: torch.nn.Module, requested: str) -> str | None:
    """Switch the LLM of `model` (an InternVL model, not wrapped) to its packed attention; returns why packed rows
    still attend through a dense mask (for a warning), or None."""
    text = model.config.text_config
    chosen = packed_implementation(text.model_type, requested, text._attn_implementation)
    if chosen != text._attn_implementation:
        model.set_attn_implementation({"text_config": chosen})
    return dense_mask_reason(text.model_type, requested)


_bounds_cache: list[Any] = [None, None]  # (tensor, its list): one host copy per forward, reused by every layer


def _bounds(cu_seq_lens: torch.Tensor) -> list[int]:
    if _bounds_cache[0] is not cu_seq_lens:
        _bounds_cache[:] = [cu_seq_lens, cu_seq_lens.tolist()]
    return _bounds_cache[1]


def _family_eager(module) -> Any:
    """The eager attention function of the modeling file that defines `module` (every transformers model has one)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _segment_mask(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Causal (and sliding-window: a query sees its last `sliding_window` keys, itself included) bool mask [n, n]."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = key <= query
    return allowed & (query - key < sliding_window) if sliding_window else allowed


def _one_segment(eager: bool, module, query, key, value, sliding_window, **kwargs) -> torch.Tensor:
    """Causal attention of one sub-sample (query / key / value [1, heads, n, d]) -> [1, n, heads, d]."""
    length = query.shape[2]
    if eager:  # the family's own eager maths (GPT-OSS: its sinks), with an additive mask as `eager_mask` builds
        allowed = _segment_mask(length, sliding_window, query.device)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
        return _family_eager(module)(module, query, key, value, mask, **kwargs)[0]
    if sliding_window and length > sliding_window:
        mask = _segment_mask(length, sliding_window, query.device)
        return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)[0]
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)[0]


def _packed_attention(eager: bool):
    def attention(module, query, key, value, attention_mask, sliding_window=None, cu_seq_lens_q=None, **kwargs):
        """query [B, heads, T, d], key / value [B, kv heads, T, d] -> ([B, T, heads, d], None)."""
        for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
            kwargs.pop(name, None)
        batch, length = query.shape[0], query.shape[2]
        if attention_mask is not None or key.shape[2] != length:  # a padded batch, or decoding with a cache
            inner = _family_eager(module) if eager else sdpa_attention_forward
            return inner(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)
        bounds = _bounds(cu_seq_lens_q) if cu_seq_lens_q is not None else list(range(0, batch * length + 1, length))
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            row, offset = divmod(start, length)
            part = slice(offset, offset + end - start)
            outputs.append(_one_segment(eager, module, query[row : row + 1, :, part], key[row : row + 1, :, part],
                                        value[row : row + 1, :, part], sliding_window, **kwargs))  # fmt: skip
        return torch.cat(outputs, dim=1).view(batch, length, *outputs[0].shape[2:]), None

    return attention


def _packed_mask(inner: str):
    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
        """No mask for whole rows without padding (the attention isolates sub-samples itself); `inner`'s otherwise."""
        if attention_mask is None and q_length == kv_length and q_offset == kv_offset == 0:
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[inner](batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                                   q_offset=q_offset, kv_offset=kv_offset,
                                                   attention_mask=attention_mask, **kwargs)  # fmt: skip

    return mask


AttentionInterface.register(PACKED_SDPA, _packed_attention(eager=False))
AttentionInterface.register(PACKED_EAGER, _packed_attention(eager=True))
AttentionMaskInterface.register(PACKED_SDPA, _packed_mask("sdpa"))
AttentionMaskInterface.register(PACKED_EAGER, _packed_mask("eager"))
