"""QLoRA's 4-bit base (bitsandbytes): the LLM in NF4 with double quantisation; ViT, projector and lm_head stay
unquantised (SPEC 8: 4-bit ViTs lose accuracy badly). bitsandbytes is imported only when a 4-bit model is asked for.
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
