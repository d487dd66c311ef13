"""4-bit MoE experts (QLoRA for InternVL3.5-30B-A3B-style models): storage size, forward, LoRA gradients, merge.

The reference for the 4-bit forward is transformers' own experts module holding weights that this test quantises and
dequantises with bitsandbytes itself, expert by expert; sizes are measured from the storages the module holds.
"""

import json

import bitsandbytes.functional as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_convert_35 import _batch, _tiny_35_config
from transformers import InternVLForConditionalGeneration

from ivl.finetune.dry_run import NF4_BITS_PER_VALUE
from ivl.model.adapters import merge_adapter
from ivl.model.checkpoint import TRAINING_INFO
from ivl.model.load import ModelConfig, load_model, save_checkpoint
from ivl.model.presets import load_demo_tokenizer
from ivl.model.quantize import dequantized, keep_training_layout
from ivl.model.quantize_experts import Experts4bit, quantize_experts

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


def _model(tokenizer, family: str = "qwen3_moe", seed: int = 0):
    config = _tiny_35_config(tokenizer, family)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    for experts in _experts(model):  # transformers leaves fused experts uninitialised outside from_pretrained
        for name in ("gate_up_proj", "down_proj"):
            torch.nn.init.normal_(getattr(experts, name), std=0.05)
    return model


def _experts(model):
    return [layer.mlp.experts for layer in model.model.language_model.layers]


def _nf4_round_trip(weight):
    """What bitsandbytes' NF4 with double quantisation gives back for each expert of a stack."""
    restored = []
    for expert in weight:
        packed, state = bnb.quantize_4bit(expert, blocksize=64, compress_statistics=True, quant_type="nf4")
        restored.append(bnb.dequantize_4bit(packed, state))
    return torch.stack(restored)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage that several share counts once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _resident_bytes(*modules) -> int:
    """Bytes of the storages behind every tensor the modules hold (parameters and buffers)."""
    return _storage_bytes(t for module in modules for t in [*module.parameters(), *module.buffers()])


def test_nf4_stack_gives_back_exactly_what_bitsandbytes_dequantises():
    # bitsandbytes' CPU kernel up to 0.46 rewrites its dynamic map's first value while quantising: whatever the
    # release, each expert must come back as bitsandbytes' own round trip gives it, bit for bit.
    from ivl.model.quantize_experts import NF4Stack

    weight = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(0))
    assert torch.equal(NF4Stack(weight).dequantize(torch.float32), _nf4_round_trip(weight))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_4bit_experts_are_small_and_compute_what_their_dequantised_weights_compute(tokenizer, family):
    model = _model(tokenizer, family)
    reference = _model(tokenizer, family)
    with torch.no_grad():
        for experts in _experts(reference):
            for name in ("gate_up_proj", "down_proj"):
                getattr(experts, name).copy_(_nf4_round_trip(getattr(experts, name)))
    bf16_bytes = sum(2 * getattr(e, name).numel() for e in _experts(model) for name in ("gate_up_proj", "down_proj"))
    assert quantize_experts(model, torch.float32) == 2
    quantized = _experts(model)
    assert all(isinstance(experts, Experts4bit) for experts in quantized)
    biases = sum(p.nbytes for e in quantized for n, p in e.named_parameters() if "bias" in n)
    weight_bytes = _resident_bytes(*quantized) - biases
    assert weight_bytes <= 0.3 * bf16_bytes, (weight_bytes, bf16_bytes)  # measured: 0.26x
    # What the planner counts for them (dry run, `ivl plan`): NF4's bits per value, within 1% of the measured bytes
    # less bitsandbytes' code tables (1 KiB for the whole model, not a per-value cost; large here beside tiny experts).
    tables = _storage_bytes(b for e in quantized for n, b in e.named_buffers() if n.endswith("code"))
    assert (weight_bytes - tables) / bf16_bytes == pytest.approx(NF4_BITS_PER_VALUE / 16, rel=0.01)
    moved = quantized[0].to(torch.float64)  # a cast keeps the zero stacks one element, the NF4 as is
    assert moved.gate_up_proj.dtype == torch.float64 and moved.gate_up_proj.untyped_storage().nbytes() == 8
    assert moved.gate_up_proj_nf4.packed.dtype == torch.uint8
    moved.to(torch.float32)
    with torch.no_grad():
        expected = reference(**_batch(reference)).logits
        got = model(**_batch(model)).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The test tells 4-bit from dense: the unquantised weights give other logits.
        dense = _model(tokenizer, family)
        assert (dense(**_batch(dense)).logits - expected).abs().max() > 1e-4


def test_only_routed_experts_are_dequantised(tokenizer, monkeypatch):
    model = _model(tokenizer)
    quantize_experts(model, torch.float32)
    experts = _experts(model)[0]
    seen = []
    original = type(experts.gate_up_proj_nf4).expert
    monkeypatch.setattr(
        type(experts.gate_up_proj_nf4), "expert", lambda self, i, d: seen.append(i) or original(self, i, d)
    )
    hidden = torch.randn(3, experts.gate_up_proj.shape[-1])
    top_k_index = torch.tensor([[0, 2], [2, 0], [0, 2]])
    experts(hidden, top_k_index, torch.full((3, 2), 0.5))
    assert sorted(seen) == [0, 0, 2, 2]  # gate_up and down of experts 0 and 2 only, each once


def _lora(model, init: bool = True):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMETERS,
        init_lora_weights=init,
    )  # fmt: skip
    return get_peft_model(model, config)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_lora_on_4bit_experts_gets_gradients_and_trains(tokenizer, family):
    model = _model(tokenizer, family)
    quantize_experts(model, torch.float32)
    peft_model = _lora(model).train()
    expert_lora = {name: p for name, p in peft_model.named_parameters() if "experts" in name and "lora_" in name}
    assert len(expert_lora) == 8  # A and B for gate_up and down, in each of 2 layers
    assert not any(p.requires_grad for name, p in peft_model.named_parameters() if "lora_" not in name)
    before = {name: p.detach().clone() for name, p in expert_lora.items()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    batch = _batch(model)
    for _ in range(2):  # B starts at zero, so A's gradient is zero until B has moved
        optimizer.zero_grad()
        output = peft_model(**batch, labels=batch["input_ids"])
        output.loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_lora.values())
    assert all(not torch.equal(p, before[name]) for name, p in expert_lora.items())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_qlora_load_stores_moe_experts_in_4bit_and_merge_folds_expert_lora(tmp_path, tokenizer, family):
    save_checkpoint(_model(tokenizer, family), tokenizer, tmp_path / "base")
    # GPT-OSS's attention sinks need the eager implementation.
    base = ModelConfig(name_or_path=str(tmp_path / "base"), dtype="float32", attn_implementation="eager")
    model, _ = load_model(base, quantize_llm=True)
    assert all(isinstance(experts, Experts4bit) for experts in _experts(model))
    assert type(model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    keep_training_layout(model)
    peft_model = _lora(model, init=False).eval()  # random A and B: an adapter that changes the model
    peft_model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / TRAINING_INFO).write_text(json.dumps({"base_model": base.__dict__, "qlora": True}))
    tokenizer.save_pretrained(tmp_path / "adapter")

    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    fresh, _ = load_model(base, quantize_llm=True)
    reference = PeftModel.from_pretrained(dequantized(fresh), tmp_path / "adapter")  # the adapter, unmerged
    with torch.no_grad():
        merged_logits = merged(**_batch(merged)).logits
        torch.testing.assert_close(merged_logits, reference(**_batch(reference)).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged_logits, peft_model(**_batch(peft_model)).logits, rtol=1e-4, atol=1e-4)
        with peft_model.disable_adapter():
            base_logits = peft_model(**_batch(peft_model)).logits
        assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter did change the model
