"""QLoRA's 4-bit base (bitsandbytes): the LLM in NF4 with double quantisation; ViT, projector and lm_head stay
unquantised (4-bit ViTs lose accuracy badly: docs/design/trainability.md). bitsandbytes is imported only when a 4-bit
model is asked for. Its loader quantises `nn.Linear` layers only; the fused experts of MoE LLMs are stored in NF4 by
`ivl.model.quantize_experts`, layer by layer while transformers reads them (`loading_4bit`).
"""

from __future__ import annotations

import torch

from ivl.model.parts import LM_HEAD_MODULE, part_modules

# Never quantised: the ViT, the projector and the lm_head (module names from the model root).
UNQUANTISED_MODULES = [*part_modules("vision"), *part_modules("projector"), LM_HEAD_MODULE]


def nf4_config(compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for QLoRA: NF4 weights, double quantisation, `compute_dtype` matmuls."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=UNQUANTISED_MODULES,
    )


def keep_training_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference while the model is being trained.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight into an inference-only layout on its first
    no-grad forward in eval mode, and never packs it back before training: the next backward fails ("a view of a
    leaf Variable that requires grad is being used in an in-place operation"). The loop evaluates mid-run, so a
    model that trains keeps the training layout (inference speed on CPU is not what a training run needs)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def loading_4bit():
    """The context in which a 4-bit `from_pretrained` also stores the fused experts of an MoE LLM in NF4, layer by
    layer as it reads them (bitsandbytes' loader alone leaves them dense): `ivl.model.quantize_load`."""
    from ivl.model.quantize_load import experts_quantised_while_loading

    return experts_quantised_while_loading()


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """The 4-bit model with every quantised weight dequantised (linear layers and MoE experts), for merging a QLoRA
    adapter into the weights it trained on."""
    from ivl.model.quantize_experts import dequantize_experts

    model = model.dequantize()  # transformers swaps each 4-bit linear for a plain one with the dequantised weight
    dequantize_experts(model)
    return model
