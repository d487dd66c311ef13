"""Attention isolation for packed batches, per attention backend (docs/design/packing.md).

A packed row holds several sub-samples, each with position ids restarting at 0. transformers (>= 4.56, so both the
5.17 on our GPU machines and 5.23) reads those restarts when no 2-D attention mask is given and no KV cache is in use
(`masking_utils.find_packed_sequence_indices`):

- `sdpa`, `eager`, `flex_attention`: the causal mask it builds becomes block-diagonal (one block per sub-sample);
- `flash_attention_2` / `_3`: varlen kernels with cu_seqlens derived from the restarts (no mask at all).

So the same forward arguments serve every backend; what this module adds is checking that the installed transformers
does that, since with an older one the rows would silently attend across sub-samples. The ViT is unaffected: it sees
tiles one by one, and the image features fill the `<IMG_CONTEXT>` positions in token order.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ivl.config import ConfigError


def check_packing_support() -> None:
    """ConfigError unless transformers isolates packed sub-samples from their position ids."""
    masking = importlib.import_module("transformers.masking_utils")
    if not hasattr(masking, "find_packed_sequence_indices"):
        raise ConfigError(
            "data.packing: this transformers does not isolate packed sequences by position ids; install "
            "transformers >= 4.56 or set data.packing=false"
        )


def packed_forward_inputs(inputs: dict[str, Any], position_ids: torch.Tensor) -> dict[str, Any]:
    """The forward arguments of a packed batch: `inputs` without the 2-D attention mask (it would switch the
    detection off), position ids [B, T] restarting per sub-sample, and no cache (which would too)."""
    kept = {key: value for key, value in inputs.items() if key != "attention_mask"}
    return {**kept, "position_ids": position_ids.to(inputs["input_ids"].device), "use_cache": False}
