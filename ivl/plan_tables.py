"""The numbers behind `ivl plan`: activation bytes per token per layer, and the runtime constants.

Activation tables (MEASURED, exact for this kit's models): the bytes autograd keeps for the backward pass, counted with
`torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded) on InternVL models built from
`ivl.model.presets` with several widths, intermediate sizes, head and KV-head counts, 2 and 3 layers, two sequence
lengths; a linear fit in (H, I, KV width, heads) left no residual. fp32 is the CPU case; "bf16" was measured under
CPU bf16 autocast over a bf16 base and stands for CUDA's bf16 autocast (same transformers code; CUDA's fused dropout
keeps a 1-byte mask where the CPU keeps a bf16 one, so LoRA's extra is, if anything, overestimated on CUDA).
`tests/test_plan.py` re-measures one case against these tables.

Runtime constants: see each one for MEASURED / CHECKED / ASSUMED.
"""

from __future__ import annotations

GIB = 2**30

# MEASURED: peak RSS of a fresh process that imported the kit (SFT recipe, peft, accelerate, bitsandbytes) and loaded
# the demo tokenizer, before any model exists: 395 MiB (torch 2.13 CPU, transformers 5.23, python 3.12; 404 MiB RSS).
CPU_BASELINE_BYTES = 395 * 2**20
# CHOSEN, then CHECKED (not fitted) by bench/plan_accuracy.py (CPU, -16% to +11% over 6 cases): glibc keeps freed
# blocks and the backward pass frees and reallocates activation gradients, so the peak RSS runs above the sum of live
# tensors by about this fraction of them.
CPU_ALLOCATOR_SLACK = 0.10
# ASSUMED: the CUDA context with cuBLAS / cuDNN handles (~0.5 GiB on recent drivers), and the caching allocator's
# fragmentation on top of live tensors. The H200 check (bench/README.md) reads torch.cuda.max_memory_allocated, which
# holds neither: with them the plans there were 3-45% above it.
CUDA_CONTEXT_BYTES = 0.5 * GIB
CUDA_ALLOCATOR_SLACK = 0.10
# From the loss's design note, CHECKED by bench/plan_accuracy.py: live copies of one fp32 logits chunk at the loss's
# peak: the chunk's logits, the logsumexp temporary, and their gradient in the recomputed backward
# (ivl.losses.token_logps).
LOSS_CHUNK_COPIES = 3

# Bytes per token per layer = cH * H + cI * I + cKV * (KV heads x head dim) + cHeads * heads + c0, for a layer that
# trains fully ("full"), is frozen with gradients flowing through it to a trained part below ("frozen": its inputs are
# not kept, its weights need none), or carries LoRA on every default target ("lora" = "full" plus LORA_EXTRA; LoRA's
# dropout keeps its mask and output, its A matrix's output r values per target).
LLM_LAYER = {
    4: {"full": (32, 16, 8, 4, 8), "frozen": (16, 12, 8, 4, 8)},
    2: {"full": (30, 8, 4, 4, 8), "frozen": (12, 6, 4, 4, 8)},
}
LLM_LORA_EXTRA = {4: (32, 4), 2: (18, 4)}  # (cH, cI) with all 7 targets (q, k, v, o, gate, up, down)
# Without LoRA dropout (`adapter.dropout: 0`; PEFT then puts an identity before A, which reads the input the base layer
# keeps anyway) a LoRA layer keeps less than a fully trained one: (cH, cI) with all 7 targets, measured as above.
LLM_LORA_EXTRA_NO_DROPOUT = {4: (-8, 0), 2: (-6, 0)}
LLM_DEFAULT_TARGETS = 7
# ViT layers (no KV grouping; the CLS token counts as a token): (cH, cI, cHeads, c0).
VISION_LAYER = {4: {"full": (40, 8, 4, 16)}, 2: {"full": (28, 4, 4, 16)}}
VISION_LORA_EXTRA = {4: (24, 4), 2: (14, 4)}  # all 6 targets (q, k, v, projection_layer, fc1, fc2)
VISION_LORA_EXTRA_NO_DROPOUT = {4: (-8, 0), 2: (-6, 0)}
VISION_DEFAULT_TARGETS = 6


def _lora_extra(extra: tuple[int, int], hidden: int, inter: int, act_bytes: int, r: int, targets: float,
                default_targets: int) -> float:  # fmt: skip
    """LoRA's additional bytes per token: `extra` (the dropout buffers, or what no dropout saves; scaled by the share
    of the default targets adapted) and each target's [r] A-projection output."""
    share = min(1.0, targets / default_targets)
    return share * (extra[0] * hidden + extra[1] * inter) + act_bytes * r * targets


def llm_layer_bytes_per_token(text, mode: str, act_bytes: int, r: int, targets: float, dropout: bool = True) -> float:
    """Saved bytes per token of one LLM decoder layer: `text` the LLM config, `mode` full | frozen | lora, activations
    of `act_bytes` (4 fp32, 2 bf16 / fp16), LoRA rank `r` on `targets` linear layers of the layer, `dropout`: LoRA
    dropout is on (`adapter.dropout` > 0)."""
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_width = text.num_key_value_heads * head_dim
    c_h, c_i, c_kv, c_heads, c_0 = LLM_LAYER[act_bytes]["frozen" if mode == "frozen" else "full"]
    total = c_h * text.hidden_size + c_i * text.intermediate_size + c_kv * kv_width + c_heads * heads + c_0
    if mode == "lora":
        extra = (LLM_LORA_EXTRA if dropout else LLM_LORA_EXTRA_NO_DROPOUT)[act_bytes]
        total += _lora_extra(extra, text.hidden_size, text.intermediate_size, act_bytes, r, targets,
                             LLM_DEFAULT_TARGETS)  # fmt: skip
    return total


def vision_layer_bytes_per_token(vision, mode: str, act_bytes: int, r: int, targets: float,
                                 dropout: bool = True) -> float:  # fmt: skip
    """Saved bytes per token of one ViT layer (`mode` full | lora; see `llm_layer_bytes_per_token`)."""
    c_h, c_i, c_heads, c_0 = VISION_LAYER[act_bytes]["full"]
    total = c_h * vision.hidden_size + c_i * vision.intermediate_size + c_heads * vision.num_attention_heads + c_0
    if mode == "lora":
        extra = (VISION_LORA_EXTRA if dropout else VISION_LORA_EXTRA_NO_DROPOUT)[act_bytes]
        total += _lora_extra(extra, vision.hidden_size, vision.intermediate_size, act_bytes, r, targets,
                             VISION_DEFAULT_TARGETS)  # fmt: skip
    return total
