"""QLoRA loading that quantises an MoE LLM's fused experts to NF4 as transformers reads them, never holding them dense.

    with experts_quantised_while_loading():
        model = InternVLForConditionalGeneration.from_pretrained(path, quantization_config=nf4_config(dtype), ...)

transformers' bitsandbytes 4-bit loading creates the model on the meta device, swaps each `nn.Linear` for a
`Linear4bit`, then reads the checkpoint one parameter at a time: each parameter is materialised from the safetensors
files, converted to the model's layout (for Qwen3-MoE the per-expert `experts.N.{gate,up,down}_proj.weight` of the
published checkpoints are stacked and concatenated into the fused `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I] by its `WeightConverter`s), quantised by the quantizer's quantise operation if the
quantizer asks for it, and set on the module, before the next parameter is read (quantising on load turns
transformers' reading threads off). Its bitsandbytes quantizer alone leaves the fused experts out: they are loaded
dense (57 GB in bf16 for InternVL3.5-30B-A3B) and can only be quantised afterwards.

`ExpertsNF4Quantizer` is transformers' own bitsandbytes 4-bit quantizer with two additions, and nothing of the loading
written here: before the weights are read it replaces each fused-experts module (still on the meta device) by an
`Experts4bit` shell, and it claims the shells' `gate_up_proj` / `down_proj` for quantisation, so that its quantise
operation receives each layer's fused dense stack on the target device and stores it in NF4 (`Experts4bit.load_weight`)
before the next one is read. Peak memory during the load: the 4-bit model so far plus one layer's stack in three
forms while transformers fuses it (the per-expert tensors, their stack, the concatenation), on the target device.

Layouts: Qwen3-MoE per expert (original and -HF InternVL3.5 checkpoints, and what transformers 5 writes) through
transformers' converters, and fused stacks as they are; GPT-OSS checkpoints in bf16 (fused `gate_up_proj` [E, H, 2I],
`down_proj` [E, I, H], biases kept dense). GPT-OSS checkpoints pre-quantised in MXFP4 (openai's gpt-oss releases)
are not: their quantization config is MXFP4's, not bitsandbytes' (convert them to bf16 first).
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers.integrations.bitsandbytes import Bnb4bitQuantize
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ivl.model.quantize_experts import WEIGHTS, Experts4bit, quantize_experts

BNB_4BIT = "bitsandbytes_4bit"  # transformers' name for its bitsandbytes 4-bit quantizer


class _QuantizeExperts(Bnb4bitQuantize):
    """bitsandbytes' quantise operation for linear weights; `Experts4bit` stacks go to NF4 expert by expert."""

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        linear, result = {}, {}
        for name, value in input_dict.items():
            module, weight = get_module_from_name(model, name)
            if isinstance(module, Experts4bit):
                result[name] = module.load_weight(weight, value[0] if isinstance(value, list) else value)
            else:
                linear[name] = value
        if linear:
            result.update(super().convert(linear, full_layer_name=full_layer_name, model=model, **kwargs))
        return result


class ExpertsNF4Quantizer(Bnb4BitHfQuantizer):
    """transformers' bitsandbytes 4-bit quantizer that also quantises fused MoE experts while loading them."""

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        quantize_experts(model, self.quantization_config.bnb_4bit_compute_dtype, weights_later=True)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        if isinstance(module, Experts4bit):
            return name in WEIGHTS
        return super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        return _QuantizeExperts(self)


@contextmanager
def experts_quantised_while_loading():
    """While inside, a bitsandbytes 4-bit `from_pretrained` loads with `ExpertsNF4Quantizer`.

    Why by swapping transformers' registry entry: `from_pretrained` builds its quantizer from the config's
    `quant_method` alone (it takes no quantizer object) and `register_quantizer` refuses a name already taken; a new
    method name would make the model stop being a bitsandbytes model for transformers and PEFT (their 4-bit checks,
    `dequantize`, saving). The subclass keeps all of that; the entry is restored on leaving."""
    previous = AUTO_QUANTIZER_MAPPING[BNB_4BIT]
    AUTO_QUANTIZER_MAPPING[BNB_4BIT] = ExpertsNF4Quantizer
    try:
        yield
    finally:
        AUTO_QUANTIZER_MAPPING[BNB_4BIT] = previous
