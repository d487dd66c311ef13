"""Bench models for `sft_throughput.py`, and where a training step's matmul work goes in them.

Two random-weight models:
- `heavy`: the first bench model (ViT 64 x 2, LLM 256 x 2) with the real 151,674-entry vocabulary: its lm_head is ~95%
  of the LLM's matmul work, so a loss that projects fewer positions looks far better than it is on a real model;
- `proportional`: InternVL3-2B's proportions scaled down for a 2-core CPU (224 px tiles: 64 LLM tokens per tile):
  the ViT's work per tile against the LLM's work on that tile's tokens, the LLM's MLP / attention widths (GQA, MLP
  5.75x the width), and the lm_head's share of the LLM's work when every position is projected (~15%).

`matmul_shares` counts multiply-adds of the linear layers and attention products (forward); `step_shares` turns them
into a LoRA step (ViT frozen: forward only; LLM: forward + activation gradients, + a recomputed forward under
checkpointing) for a sample of a given tile count, so the JSON shows that the scaled model keeps the real one's shares.
"""

from __future__ import annotations

from typing import Any

# InternVL3-2B: InternViT-300M (1024 x 24, MLP 4096, 448 px tiles: 1,025 tokens, 256 after pixel shuffle) and
# Qwen2.5-1.5B (1536 x 28, MLP 8960, 12 heads / 2 KV heads of 128, vocabulary 151,674).
INTERNVL3_2B = {
    "vision": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16),
    "text": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151_674),
    "tile_size": 448,
}  # fmt: skip
PROPORTIONAL = {
    "vision": dict(hidden_size=128, num_hidden_layers=6, intermediate_size=512, num_attention_heads=2),
    "text": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1472, num_attention_heads=4,
                 num_key_value_heads=1, vocab_size=3_456),
    "tile_size": 224,
}  # fmt: skip
HEAVY = {
    "vision": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4),
    "text": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=1024, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151_674),
    "tile_size": 224,
}  # fmt: skip
MODELS = {"heavy": HEAVY, "proportional": PROPORTIONAL}


def matmul_shares(spec: dict[str, Any]) -> dict[str, float]:
    """Forward multiply-adds: per tile in the ViT (with its attention), per LLM token in the layers (attention products
    at `context` tokens left out: they depend on the sample) and in the lm_head."""
    vision, text = spec["vision"], spec["text"]
    patches = (spec["tile_size"] // 14) ** 2 + 1
    width = vision["hidden_size"]
    vit_layer = 4 * width * width + 2 * width * vision["intermediate_size"]
    vit_tile = vision["num_hidden_layers"] * (patches * vit_layer + 2 * patches * patches * width)
    hidden = text["hidden_size"]
    head_dim = hidden // text["num_attention_heads"]
    kv = text["num_key_value_heads"] * head_dim
    llm_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * text["intermediate_size"]
    return {"vit_per_tile": vit_tile, "llm_layers_per_token": text["num_hidden_layers"] * llm_layer,
            "lm_head_per_token": hidden * text["vocab_size"], "tokens_per_tile": (patches - 1) // 4}  # fmt: skip


def step_shares(spec: dict[str, Any], tiles: int, text_tokens: int, checkpointing: bool) -> dict[str, float]:
    """Shares of a LoRA step's matmul work (ViT frozen) for one sample of `tiles` tiles and `text_tokens` text tokens,
    with the lm_head on every position (a padded loop) and the lm_head's share of the LLM's forward."""
    work = matmul_shares(spec)
    tokens = tiles * work["tokens_per_tile"] + text_tokens
    llm_passes = 3 if checkpointing else 2  # forward + activation gradients (+ recomputed forward)
    vit = tiles * work["vit_per_tile"]
    llm = llm_passes * tokens * work["llm_layers_per_token"]
    head = 2 * tokens * work["lm_head_per_token"]  # forward + gradient w.r.t. the hidden states (lm_head frozen)
    total = vit + llm + head
    llm_forward = work["llm_layers_per_token"] + work["lm_head_per_token"]
    return {"tiles": tiles, "tokens": tokens, "vit_share": vit / total, "lm_head_share_of_step": head / total,
            "lm_head_share_of_llm_forward": work["lm_head_per_token"] / llm_forward}  # fmt: skip


def proportions_report(name: str, text_tokens: int, checkpointing: bool) -> dict[str, Any]:
    """The bench model's step shares next to InternVL3-2B's, at 7 and 13 tiles (InternVL's max_dynamic_patch 6 and 12,
    each with its thumbnail)."""
    return {
        model: [step_shares(spec, tiles, text_tokens, checkpointing) for tiles in (7, 13)]
        for model, spec in ((name, MODELS[name]), ("internvl3-2b", INTERNVL3_2B))
    }
