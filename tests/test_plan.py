"""`ivl plan`: itemised peak memory, its response to tiles / length / batch / checkpointing / QLoRA, proposals that
fit when re-planned, the CLI, and the activation tables against what autograd really keeps."""

import json
from types import SimpleNamespace

import pytest
import torch

from ivl.cli import main as cli_main
from ivl.config import ConfigError
from ivl.plan import plan_file
from ivl.plan_proposals import format_plan
from ivl.plan_tables import GIB, llm_layer_bytes_per_token, vision_layer_bytes_per_token

ZOO_1B = "configs/sft/internvl3_1b_lora.yaml"  # a hub id the planner must know without downloading


def activations(plan) -> float:
    return sum(value for name, value in plan.items.items() if "activations" in name)


# InternVL3-1B's shapes, restated: InternViT-300M (width 1024, MLP 4096, 14 px patches of 448 px tiles, 256 image
# tokens per tile) and Qwen2.5-0.5B (24 layers, width 896, MLP 4864, 14 heads, 2 KV heads of 64, vocabulary 151674).
VIT_WIDTH, VIT_MLP, VIT_TOKENS_PER_TILE, IMAGE_TOKENS_PER_TILE = 1024, 4096, (448 // 14) ** 2 + 1, 256
LLM_LAYERS, LLM_WIDTH, LLM_MLP, KV_WIDTH, VOCAB = 24, 896, 4864, 2 * 64, 151674


def _restated_1b_items(rows: int) -> dict[str, float]:
    """The zoo 1B config's items (stage2-lora: frozen ViT, full projector, LoRA r=16 on the LLM's 7 linear layers,
    checkpointing on; bf16 activations = 2 bytes; 8192 tokens and 6 + 1 thumbnail tiles per row), each from its own
    formula rather than the planner's code."""
    tokens, tiles, act = rows * 8192, rows * 7, 2
    projector = 2 * 4 * VIT_WIDTH + (4 * VIT_WIDTH * LLM_WIDTH + LLM_WIDTH) + (LLM_WIDTH * LLM_WIDTH + LLM_WIDTH)
    lora_per_layer = 16 * (2 * (LLM_WIDTH + LLM_WIDTH) + 2 * (LLM_WIDTH + KV_WIDTH) + 3 * (LLM_WIDTH + LLM_MLP))
    trainable = projector + LLM_LAYERS * lora_per_layer  # parameters, fp32 masters
    items = {
        "trainable weights (fp32)": 4 * trainable,
        "gradients (fp32)": 4 * trainable,
        "optimizer states (adamw)": 2 * 4 * trainable,
        # A frozen ViT keeps no graph: one layer's forward (input, output, MLP hidden) over every tile's tokens.
        "vision activations": tiles * VIT_TOKENS_PER_TILE * (2 * VIT_WIDTH + VIT_MLP) * act,
        # Pixel-shuffled features (4x ViT width) and their norm, linear_1 and its GELU (LLM width), per image token.
        "projector activations": tiles * IMAGE_TOKENS_PER_TILE * (8 * VIT_WIDTH + 2 * LLM_WIDTH) * act,
        "pixel values": tiles * 3 * 448**2 * (1 + act),  # uint8 tiles + their normalised bf16 copy
        # Checkpointing: each layer keeps its input; + the embeddings and the final norm's output.
        "llm activations": (LLM_LAYERS + 2) * tokens * LLM_WIDTH * act,
        "logits + loss (one chunk)": 3 * (2**25 // VOCAB) * VOCAB * 4,  # 3 live copies of one fp32 chunk
    }
    # No [B, 1, T, T] padding mask at any batch size: SFT's right-padded rows attend causally without one.
    return items


@pytest.mark.parametrize("rows", [1, 2])
def test_zoo_1b_items_equal_their_formulas_and_the_zoo_needs_no_download(rows):
    plan = plan_file(ZOO_1B, [f"loop.batch_size={rows}"], device="cuda")
    assert plan.dtype == "bfloat16" and plan.workload == {"rows": rows, "tokens_per_row": 8192, "tiles": 7 * rows,
                                                          "reference_pass": False}  # fmt: skip
    expected = _restated_1b_items(rows)
    assert {name: plan.items[name] for name in expected} == expected
    assert 1.5 * GIB < plan.items["frozen weights"] < 2.0 * GIB  # InternVL3-1B: 938M parameters in bf16
    live = sum(expected.values()) + plan.items["frozen weights"] + plan.items["backward working set"]
    assert set(plan.items) == {*expected, "frozen weights", "backward working set", "allocator slack (assumed)",
                               "cuda context (assumed)"}  # fmt: skip
    assert plan.total_bytes == pytest.approx(1.1 * live + 0.5 * GIB, rel=1e-12)  # 10% slack + the CUDA context
    assert plan.to_json()["total_gib"] == pytest.approx((1.1 * live + 0.5 * GIB) / GIB, rel=1e-12)
    if rows == 2:  # the backward working set (one layer's gradients and its recomputed activations) is per token
        one = plan_file(ZOO_1B, ["loop.batch_size=1"], device="cuda")
        assert plan.items["backward working set"] == 2 * one.items["backward working set"]


@pytest.mark.parametrize(
    "small, large",
    [
        ("data.max_tiles=2", "data.max_tiles=12"),
        ("data.max_length=2048", "data.max_length=8192"),
        ("loop.batch_size=1", "loop.batch_size=2"),
    ],
)
def test_more_tiles_tokens_or_rows_need_more_activation_memory(small, large):
    overrides = ["stage=none", "vision.mode=lora", "projector.mode=full", "llm.mode=lora"]
    assert activations(plan_file(ZOO_1B, [*overrides, large])) > activations(plan_file(ZOO_1B, [*overrides, small]))


def test_checkpointing_and_qlora_reduce_the_peak():
    plain = plan_file(ZOO_1B, ["llm.gradient_checkpointing=false"])
    checkpointed = plan_file(ZOO_1B, ["llm.gradient_checkpointing=true"])
    assert checkpointed.items["llm activations"] < plain.items["llm activations"] / 10
    assert checkpointed.total_bytes < plain.total_bytes
    qlora = plan_file(ZOO_1B, ["adapter.qlora=true"])
    assert qlora.items["frozen weights"] < 0.8 * checkpointed.items["frozen weights"]
    assert qlora.total_bytes < checkpointed.total_bytes


def test_proposals_fit_when_re_planned():
    config = "configs/sft/internvl3_8b_lora.yaml"
    overrides = ["llm.gradient_checkpointing=false"]
    plan = plan_file(config, overrides, memory_gib=24)
    assert not plan.fits and plan.proposals
    for proposal in plan.proposals:
        again = plan_file(config, [*overrides, *proposal["changes"]], memory_gib=24)
        assert again.fits and again.total_gib == pytest.approx(proposal["total_gib"])


def test_mpo_doubles_the_llm_rows_but_not_the_tiles(tmp_path):
    config = tmp_path / "mpo.yaml"
    config.write_text(open(ZOO_1B).read() + "mpo: {beta: 0.1}\n")
    from ivl.plan import RECIPES, plan_sft, recipe_of

    assert recipe_of(str(config), []) == "mpo"
    sft_config = RECIPES["sft"][0](ZOO_1B, [])
    sft, mpo = plan_sft(sft_config, "cuda", 24), plan_sft(sft_config, "cuda", 24, "mpo", pair_rows=True)
    assert mpo.workload["rows"] == 2 * sft.workload["rows"] and mpo.workload["tiles"] == sft.workload["tiles"]
    assert mpo.items["llm activations"] == pytest.approx(2 * sft.items["llm activations"])
    assert "reference forward (no grad)" in mpo.items
    # MPO's forward passes its padding mask; SFT's right-padded batches run without one (ivl.model.forward).
    assert mpo.items["attention mask (padded batch)"] == mpo.workload["rows"] * 8192**2
    assert "attention mask (padded batch)" not in sft.items


def test_distillation_offline_needs_no_teacher():
    online = plan_file("configs/distill/internvit_6b_to_300m.yaml", [])
    offline = plan_file("configs/distill/internvit_6b_to_300m.yaml", ["mode=offline"])
    assert online.recipe == "distill" and online.items["teacher weights"] > 10 * GIB  # 5.5B parameters in bf16
    assert not any(name.startswith("teacher") for name in offline.items)


def test_cli_json(capsys):
    assert (
        cli_main(
            [
                "plan",
                ZOO_1B,
                "--device",
                "cpu",
                "--memory-gib",
                "8",
                "--json",
                "data.max_length=4096",
                "model.dtype=auto",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["memory_gib"] == 8
    assert report["workload"]["tokens_per_row"] == 4096
    assert "process baseline (measured)" in report["items_gib"] and isinstance(report["fits"], bool)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([ZOO_1B, "data.max_lenght=4096"], "did you mean 'data.max_length'"),
        (["missing.yaml"], "config file not found"),
        ([ZOO_1B, "--memory-gib", "0"], "--memory-gib"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert cli_main(["plan", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and message in error and "Traceback" not in error


def bytes_saved_for_backward(model, forward) -> int:
    """Bytes autograd keeps for the backward pass of `forward()` on `model` in training mode: each storage once,
    parameters excluded (counted with saved-tensor hooks)."""
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_llm_table_equals_what_autograd_keeps(dropout):
    """Bytes saved for backward per token of one LoRA decoder layer (fp32), counted with saved-tensor hooks on a
    3- and a 2-layer model at two lengths, equal the table's prediction; without LoRA dropout PEFT's A matrix reads
    the layer input itself, so no dropout mask or output is kept."""
    from transformers import InternVLForConditionalGeneration

    from ivl.model.adapters import AdapterConfig, VisionPartConfig, apply_trainability
    from ivl.model.presets import TINY_VISION, _make_config

    text = dict(model_type="qwen2", hidden_size=96, intermediate_size=160, num_attention_heads=3,
                num_key_value_heads=1, vocab_size=512, tie_word_embeddings=False)  # fmt: skip
    vision = {**TINY_VISION, "num_hidden_layers": 1}

    def saved_bytes(layers: int, tokens: int) -> int:
        torch.manual_seed(0)
        config = _make_config(vision, {**text, "num_hidden_layers": layers}, 500, image_size=112)
        model = InternVLForConditionalGeneration(config)
        model = apply_trainability(model, {"vision": "frozen", "projector": "full", "llm": "lora"},
                                   VisionPartConfig(), AdapterConfig(r=8, dropout=dropout))  # fmt: skip
        ids = torch.randint(0, 400, (1, tokens))
        return bytes_saved_for_backward(model, lambda: model(input_ids=ids, logits_to_keep=1))

    per_layer = (saved_bytes(3, 256) - saved_bytes(3, 128) - saved_bytes(2, 256) + saved_bytes(2, 128)) / 128
    config = _make_config(vision, {**text, "num_hidden_layers": 2}, 500, image_size=112).text_config
    expected = llm_layer_bytes_per_token(config, "lora", 4, r=8, targets=7, dropout=dropout > 0)
    assert per_layer == pytest.approx(expected)


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_vision_table_equals_what_autograd_keeps(dropout):
    """The same for one LoRA ViT layer (fp32): 3- and 2-layer towers at one and two tiles."""
    from transformers import InternVLForConditionalGeneration

    from ivl.model.adapters import AdapterConfig, VisionPartConfig, apply_trainability
    from ivl.model.presets import TINY_LLM, TINY_VISION, _make_config

    vision = {**TINY_VISION, "hidden_size": 64, "intermediate_size": 256}
    text = {**TINY_LLM, "vocab_size": 512, "num_hidden_layers": 1}

    def saved_bytes(layers: int, tiles: int) -> int:
        torch.manual_seed(0)
        model = InternVLForConditionalGeneration(_make_config({**vision, "num_hidden_layers": layers}, text, 500, 112))
        model = apply_trainability(model, {"vision": "lora", "projector": "full", "llm": "frozen"},
                                   VisionPartConfig(), AdapterConfig(r=8, dropout=dropout))  # fmt: skip
        tower = next(module for name, module in model.named_modules() if name.endswith("vision_tower"))
        return bytes_saved_for_backward(model, lambda: tower(pixel_values=torch.randn(tiles, 3, 112, 112)))

    patches = (112 // 14) ** 2 + 1  # + the CLS token
    per_layer = (saved_bytes(3, 2) - saved_bytes(3, 1) - saved_bytes(2, 2) + saved_bytes(2, 1)) / patches
    config = SimpleNamespace(hidden_size=64, intermediate_size=256, num_attention_heads=vision["num_attention_heads"])
    expected = vision_layer_bytes_per_token(config, "lora", 4, r=8, targets=6, dropout=dropout > 0)
    assert per_layer == pytest.approx(expected)


def test_an_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="--device"):
        plan_file(ZOO_1B, [], device="tpu")


@pytest.mark.slow
def test_internvl35_moe_qlora_fits_a_24gb_card_with_its_experts_in_nf4():
    """Predictions (no GPU measured them): InternVL3.5-30B-A3B QLoRA <= 22 GiB and InternVL3.5-8B QLoRA <= 12 GiB at
    4k tokens and 6 tiles (+ thumbnail); the fused expert weights count in NF4 under QLoRA."""
    moe = plan_file("configs/sft/internvl3_5_30b_a3b_qlora.yaml", [], device="cuda", memory_gib=24)
    assert moe.workload["tokens_per_row"] == 4096 and moe.workload["tiles"] == 7
    assert moe.total_gib <= 22 and "router logits + load-balancing loss" in moe.items
    # Loading stores the experts in NF4 layer by layer: 48 layers x 128 experts x (2 x 768) x 2048 gate_up values
    load = next(note for note in moe.notes if note.startswith("loading:"))
    assert "never the 54 GiB of dense experts" in load and "+ 2.2 GiB while one layer's experts are fused" in load
    bf16_experts = plan_file("configs/sft/internvl3_5_30b_a3b_qlora.yaml", ["adapter.qlora=false"], device="cuda")
    assert moe.items["frozen weights"] < 0.3 * bf16_experts.items["frozen weights"]
    assert "expert weights + LoRA delta (bf16 experts)" in bf16_experts.items
    assert plan_file("configs/sft/internvl3_5_8b_qlora.yaml", [], device="cuda").total_gib <= 12


def test_rl_plans_g_rows_per_prompt_and_the_generation_cache():
    config = "configs/rl/internvl3_5_8b_qlora_gspo.yaml"
    plan = plan_file(config, [])
    assert plan.recipe == "rl" and plan.workload["rows"] == 8 and plan.fits  # the shipped config's prediction
    assert plan.workload["tokens_per_row"] == plan.workload["prompt_tokens"] + 1024
    more = plan_file(config, ["rl.num_generations=16"])
    assert more.workload["kv_cache_gib"] == pytest.approx(2 * plan.workload["kv_cache_gib"])
    assert activations(more) > activations(plan)
    with_kl = plan_file(config, ["loss.beta=0.04"])
    assert "reference forward (no grad)" in with_kl.items and with_kl.total_gib > plan.total_gib
    short = plan_file(config, ["rl.max_new_tokens=16", "data.max_tiles=1", "loop.batch_size=1"])
    assert short.items["generation beyond the update (KV cache)"] == 0  # the update is the larger phase


def test_checkpointing_every_kth_llm_layer_keeps_the_other_layers_activations():
    hidden = 8192 * LLM_WIDTH * 2  # one layer's input: 8192 tokens x width, bf16
    plain = plan_file(ZOO_1B, ["llm.gradient_checkpointing=false"])
    per_layer = (plain.items["llm activations"] - 2 * hidden) / LLM_LAYERS  # what an unchekpointed layer keeps
    # Layers 0, k, 2k, ... recompute (ceil(24 / k) of them); one of them comes back whole in the backward pass.
    for every, checkpointed in ((1, 24), (2, 12), (5, 5), (16, 2), (24, 1)):
        plan = plan_file(ZOO_1B, [f"llm.checkpoint_every={every}"])
        expected = checkpointed * hidden + (LLM_LAYERS - checkpointed) * per_layer + 2 * hidden
        assert plan.items["llm activations"] == pytest.approx(expected, rel=1e-12), every
        assert plan.items["backward working set"] == pytest.approx(plain.items["backward working set"] + per_layer)


def test_plan_offers_less_checkpointing_where_it_still_fits():
    at_24 = plan_file(ZOO_1B, [], memory_gib=24, speedups=True)  # checkpointing every layer: 4.6 GiB
    choices = [["llm.checkpoint_every=2"], ["llm.checkpoint_every=4"], ["llm.checkpoint_every=8"],
               ["llm.checkpoint_every=16"], ["llm.gradient_checkpointing=false"]]  # fmt: skip
    assert [choice["changes"] for choice in at_24.speedups] == choices
    for choice in at_24.speedups:
        assert choice["total_gib"] == pytest.approx(plan_file(ZOO_1B, choice["changes"]).total_gib, rel=1e-12)
    assert at_24.speedups[0]["why"] == ("recomputes 12 of 24 LLM layers (~50% of an LLM forward pass per step) "
                                        "instead of 24")  # fmt: skip
    assert at_24.speedups[-1]["why"] == ("no recompute: saves the forward pass of the 24 checkpointed LLM layers "
                                         "per step")  # fmt: skip
    at_16 = plan_file(ZOO_1B, [], memory_gib=16, speedups=True)  # every 2nd layer needs 14.7 GiB, every 4th 19.8
    assert [choice["changes"] for choice in at_16.speedups] == [["llm.checkpoint_every=2"]]
    assert plan_file(ZOO_1B, ["llm.gradient_checkpointing=false"], speedups=True).speedups == []  # nothing to lighten
    assert plan_file(ZOO_1B, []).speedups == []  # only asked for by `ivl plan`
    assert "faster choices that still fit" in format_plan(at_16)


def test_a_plan_that_does_not_fit_checkpoints_the_fewest_llm_layers_that_fit():
    # InternVL3-1B LoRA at 8k tokens: no checkpointing 24.0 GiB, every 4th layer 19.8, every 2nd 14.7.
    overrides = ["llm.gradient_checkpointing=false"]
    for memory, every, checkpointed in ((20, 4, 6), (16, 2, 12)):
        proposal = plan_file(ZOO_1B, overrides, memory_gib=memory).proposals[0]
        assert proposal["changes"] == ["llm.gradient_checkpointing=true", f"llm.checkpoint_every={every}"]
        assert proposal["why"].startswith(f"gradient checkpointing: recomputes {checkpointed} of 24 LLM layers")
