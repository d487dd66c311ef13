"""Packed rows attend per sub-sample without a dense mask: logits and gradients of packed rows equal those of the
sub-samples run alone (fp32, CPU) for every LLM family the kit packs; the cumulative lengths equal transformers' own;
`ivl plan` and `ivl sft` warn when packing falls back to a dense mask."""

import pytest
import torch
from transformers import masking_utils
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from ivl.model.load import ModelConfig, load_model
from ivl.model.packed_attention import (
    PACKED_EAGER,
    PACKED_SDPA,
    _packed_attention,
    dense_mask_reason,
    packed_forward_inputs,
    sequence_lengths,
    use_packed_attention,
)
from ivl.model.parts import model_parts
from ivl.plan import plan_file
from ivl.runtime import checkpoint_activations

# Two packed rows of 24 tokens: sub-sample lengths per row (the rest of a row is its padding tail). GPT-OSS's tiny
# preset has an 8-token sliding window on every other layer: the 11- and 13-token sub-samples exceed it.
ROWS = [[5, 11, 6], [13, 9]]
LENGTH = 24
FAMILIES = {"tiny-112": ("qwen2", PACKED_SDPA), "tiny-qwen3": ("qwen3", PACKED_SDPA),
            "tiny-qwen3-moe": ("qwen3_moe", PACKED_SDPA), "tiny-gpt-oss": ("gpt_oss", PACKED_EAGER),
            "tiny-llama": ("llama", PACKED_SDPA), "tiny-phi3": ("phi3", PACKED_SDPA)}  # fmt: skip


def _packed_batch(vocab: int):
    generator = torch.Generator().manual_seed(0)
    samples = [[torch.randint(5, vocab, (n,), generator=generator) for n in row] for row in ROWS]
    input_ids = torch.zeros(len(ROWS), LENGTH, dtype=torch.long)
    position_ids = torch.zeros(len(ROWS), LENGTH, dtype=torch.long)
    spans = []  # (row, start, sample)
    for row, row_samples in enumerate(samples):
        start = 0
        for sample in row_samples:
            input_ids[row, start : start + len(sample)] = sample
            position_ids[row, start : start + len(sample)] = torch.arange(len(sample))
            spans.append((row, start, sample))
            start += len(sample)
        position_ids[row, start:] = torch.arange(LENGTH - start)
    return input_ids, position_ids, spans


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# + Qwen2 under gradient checkpointing: the backward pass replays each layer with the same cumulative lengths.
@pytest.mark.parametrize("preset, checkpointed", [*((preset, False) for preset in FAMILIES), ("tiny-112", True)])
def test_packed_rows_give_the_logits_and_gradients_of_their_sub_samples_alone(preset, checkpointed, monkeypatch):
    family, implementation = FAMILIES[preset]
    model, _ = load_model(ModelConfig(name_or_path=f"preset:{preset}", dtype="float32"))
    assert model.config.text_config.model_type == family
    assert use_packed_attention(model, "sdpa") is None
    assert model.config.text_config._attn_implementation == implementation
    if checkpointed:
        checkpoint_activations(model_parts(model).llm)
    model.train()
    input_ids, position_ids, spans = _packed_batch(model.config.text_config.vocab_size)
    vocab = model.config.text_config.vocab_size
    weights = torch.randn(len(ROWS), LENGTH, vocab, generator=torch.Generator().manual_seed(1))

    model.zero_grad()
    alone = []
    for row, start, sample in spans:
        logits = model(input_ids=sample[None], attention_mask=torch.ones(1, len(sample), dtype=torch.long)).logits[0]
        (logits * weights[row, start : start + len(sample)]).sum().backward()
        alone.append(logits.detach())
    alone_grads = _grads(model)

    # No dense mask: neither of transformers' mask builders runs for the packed forward.
    built = []
    for name in ("sdpa", "eager"):
        builder = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[name]
        monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name,
                            lambda *a, _b=builder, **k: built.append(1) or _b(*a, **k))  # fmt: skip
    model.zero_grad()
    inputs = packed_forward_inputs({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, position_ids)
    logits = model(**inputs).logits
    padding = torch.zeros(len(ROWS), LENGTH, 1)
    for row, start, sample in spans:
        padding[row, start : start + len(sample)] = 1
    (logits * weights * padding).sum().backward()
    assert not built
    for (row, start, sample), expected in zip(spans, alone, strict=True):
        torch.testing.assert_close(logits[row, start : start + len(sample)].detach(), expected, rtol=1e-5, atol=1e-5)
    packed_grads = _grads(model)
    assert packed_grads.keys() == alone_grads.keys()
    for name, grad in packed_grads.items():  # fp32 sums in another order: equal to 1e-5 of the largest entry
        expected = alone_grads[name]
        assert (grad - expected).abs().max() <= 1e-5 * expected.abs().max(), name


def test_cumulative_lengths_equal_transformers_own_over_the_flattened_rows():
    _, position_ids, _ = _packed_batch(100)
    bounds, longest = sequence_lengths(position_ids)
    (expected, _), (expected_longest, _) = prepare_fa_kwargs_from_position_ids(position_ids.reshape(1, -1))
    assert bounds.tolist() == expected.tolist() == [0, 5, 16, 22, 24, 37, 46, 48]
    assert bounds.dtype == expected.dtype == torch.int32 and longest == expected_longest == 13


def test_padded_batches_and_generation_still_run_through_the_packed_implementation():
    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-qwen3", dtype="float32"))
    input_ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding, as generation pads
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=mask).logits
        plain_answer = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        use_packed_attention(model, "sdpa")
        packed = model(input_ids=input_ids, attention_mask=mask).logits
        answer = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(packed[mask.bool()], plain[mask.bool()])
    assert torch.equal(answer, plain_answer)


def test_dense_mask_cases_are_named():
    assert dense_mask_reason("qwen2", "sdpa") is None
    assert dense_mask_reason("gpt_oss", "sdpa") is None  # its attention sinks run per sub-sample in eager maths
    assert dense_mask_reason("qwen2", "flash_attention_2") is None  # varlen kernels
    assert "attn_implementation=eager" in dense_mask_reason("qwen2", "eager")
    assert "internlm3" in dense_mask_reason("internlm3", "sdpa")


ZOO_1B = "configs/sft/internvl3_1b_lora.yaml"
PACKED = ["data.packing=true", "loop.max_steps=10"]


def test_plan_warns_when_packing_runs_through_a_dense_mask():
    warning = "warning: data.packing: packed rows attend through a dense T x T mask"
    eager = plan_file(ZOO_1B, [*PACKED, "model.attn_implementation=eager"])
    assert any(note.startswith(warning) for note in eager.notes)
    for overrides in ([*PACKED], [*PACKED, "loop.batch_size=2"], ["loop.batch_size=2"]):
        plan = plan_file(ZOO_1B, overrides)
        assert not any("dense" in note for note in plan.notes)
    # Packed rows attending per sub-sample need no [B, 1, T, T] mask, whatever the batch.
    assert "attention mask (padded batch)" not in plan_file(ZOO_1B, [*PACKED, "loop.batch_size=2"]).items


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_sft_warns_when_packing_runs_through_a_dense_mask(shapes, tmp_path, capsys, attention):
    from ivl.config import load_config
    from ivl.finetune.sft import SFTConfig, run_sft

    overrides = [f"data.train={shapes / 'train.jsonl'}", "data.max_tiles=1", "data.use_thumbnail=false",
                 "model.name_or_path=preset:tiny-112", "model.dtype=float32", f"model.attn_implementation={attention}",
                 "loop.max_steps=1", "loop.num_workers=0", "data.packing=true", "data.pack_max_tokens=160",
                 "data.pack_max_tiles=4", f"loop.output_dir={tmp_path}"]  # fmt: skip
    run_sft(load_config(SFTConfig, None, overrides))
    warned = "warning: data.packing: packed rows attend through a dense T x T mask" in capsys.readouterr().out
    assert warned == (attention == "eager")


@pytest.mark.parametrize("length", [4, 5, 6, 9])
def test_sdpa_sub_samples_keep_a_sliding_window(length):
    """A sub-sample of an sdpa family with a sliding window of 4 (a query sees itself and the 3 keys before it),
    at, just past and well past the window, equals softmax attention under that mask restated."""
    generator = torch.Generator().manual_seed(length)
    query, key, value = (torch.randn(1, 2, length, 8, generator=generator) for _ in range(3))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    bounds = torch.tensor([0, length], dtype=torch.int32)
    output, _ = _packed_attention(eager=False)(module, query, key, value, None, sliding_window=4,
                                               cu_seq_lens_q=bounds, scaling=8**-0.5)  # fmt: skip
    positions = torch.arange(length)
    allowed = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < 4)
    scores = (query @ key.transpose(-1, -2) * 8**-0.5).masked_fill(~allowed, float("-inf"))
    expected = (scores.softmax(-1) @ value).transpose(1, 2)
    torch.testing.assert_close(output, expected)
