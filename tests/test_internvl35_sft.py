"""SFT end to end on tiny InternVL3.5-family checkpoints written by plain transformers: LoRA, partial LoRA and QLoRA
runs, merge, resume, expert LoRA and the routers' load-balancing loss."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

from ivl.config import load_config
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.model.adapters import AdapterConfig, VisionPartConfig, apply_trainability, load_trained, merge_adapter
from ivl.model.load import ModelConfig, load_model, save_checkpoint
from ivl.model.moe import load_balancing_loss, router_logits_caught

pytestmark = pytest.mark.slow

FAMILIES = ("tiny-qwen3", "tiny-qwen3-moe", "tiny-gpt-oss")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family as a local checkpoint saved by `save_pretrained` (loaded by path, like a downloaded one)."""
    paths = {}
    for preset in FAMILIES:
        model, tokenizer = load_model(ModelConfig(name_or_path=f"preset:{preset}", dtype="float32"))
        paths[preset] = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp(preset))
    return paths


def sft_config(shapes, checkpoint, out, *overrides):
    return load_config(SFTConfig, None, [
        f"model.name_or_path={checkpoint}", f"data.train={shapes / 'train.jsonl'}", "data.max_tiles=1",
        "data.use_thumbnail=false", "model.dtype=float32", "adapter.dropout=0", "optim.lr=5e-3",
        "optim.warmup_ratio=0", "loop.max_steps=3", "loop.log_every=1", "loop.num_workers=0", "loop.batch_size=4",
        f"loop.output_dir={out}", *overrides,
    ])  # fmt: skip


def _metrics(out):
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def _image_batch(model):
    ids = torch.cat([torch.tensor([[1, 2]]), torch.full((1, 16), model.config.image_token_id),
                     torch.tensor([[5, 9, 33, 70]])], dim=1)  # fmt: skip
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("preset", FAMILIES)
def test_lora_trains_merges_and_reloads_with_plain_transformers(shapes, checkpoints, tmp_path, preset):
    result = run_sft(sft_config(shapes, checkpoints[preset], tmp_path / "run"))
    metrics = _metrics(tmp_path / "run")
    assert [row["step"] for row in metrics] == [1, 2, 3]
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    moe = preset != "tiny-qwen3"
    # Expert LoRA: trained (lora_B starts at zero), and the load-balancing loss is logged at every step.
    expert_b = [key for key in adapter if ".experts." in key and "lora_B" in key]
    assert bool(expert_b) == moe and all(adapter[key].abs().sum() > 0 for key in expert_b)
    assert all(("router_aux_loss" in row) == moe for row in metrics)
    assert all(row["router_aux_loss"] > 0 for row in metrics if moe)
    adapter_model, _, _ = load_trained(result.output)
    merge_adapter(result.output, tmp_path / "merged")
    merged = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert merged.config.text_config.model_type == adapter_model.config.text_config.model_type
    base, _ = load_model(ModelConfig(name_or_path=str(checkpoints[preset]), dtype="float32"))
    batch = _image_batch(merged)
    with torch.no_grad():
        expected = adapter_model(**batch).logits
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)


@pytest.mark.parametrize("preset", FAMILIES)
def test_partial_lora_runs_on_every_family(shapes, checkpoints, tmp_path, preset):
    run_sft(sft_config(shapes, checkpoints[preset], tmp_path, "adapter.kind=partial_lora", "loop.max_steps=2"))
    adapter_model, _, _ = load_trained(tmp_path / "adapter")
    base, _ = load_model(ModelConfig(name_or_path=str(checkpoints[preset]), dtype="float32"))
    text = torch.tensor([[1, 2, 5, 9, 33, 70]])
    with torch.no_grad():  # text-only prompts go through the frozen LLM unchanged
        torch.testing.assert_close(adapter_model(input_ids=text).logits, base(input_ids=text).logits)


def test_qlora_runs_on_qwen3(shapes, checkpoints, tmp_path):
    run_sft(sft_config(shapes, checkpoints["tiny-qwen3"], tmp_path, "adapter.qlora=true", "loop.max_steps=2"))
    adapter_model, _, info = load_trained(tmp_path / "adapter")
    assert info["qlora"] is True
    layer = adapter_model.get_base_model().model.language_model.layers[0]
    assert type(layer.self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_resumed_moe_run_reproduces_the_uninterrupted_losses(shapes, checkpoints, tmp_path):
    overrides = ("loop.max_steps=4", "loop.save_every=2", "loop.keep_last=5")
    config = sft_config(shapes, checkpoints["tiny-qwen3-moe"], tmp_path, *overrides)
    run_sft(config)
    uninterrupted = _metrics(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "adapter")
    run_sft(sft_config(shapes, checkpoints["tiny-qwen3-moe"], tmp_path, *overrides))
    resumed = _metrics(tmp_path)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["router_aux_loss"] == pytest.approx(b["router_aux_loss"], abs=1e-6)


@pytest.mark.parametrize("preset", ("tiny-qwen3-moe", "tiny-gpt-oss"))
def test_load_balancing_loss_is_the_switch_formula_and_reaches_the_expert_lora(checkpoints, preset):
    model, _ = load_model(ModelConfig(name_or_path=str(checkpoints[preset]), dtype="float32"))
    model = apply_trainability(model, {"vision": "frozen", "projector": "frozen", "llm": "lora"}, VisionPartConfig(),
                               AdapterConfig(dropout=0.0))  # fmt: skip
    with torch.no_grad():  # non-zero B so every LoRA factor gets a gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    ids = torch.randint(10, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with router_logits_caught(model) as logits:
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    assert len(logits) == 2 and logits[0].shape == (24, 4)
    aux = load_balancing_loss(model, logits, mask)
    # Restated: E x sum_e (share of the top-k assignments that go to e) x (mean router probability of e), all layers.
    probs = torch.cat([torch.softmax(layer, dim=-1) for layer in logits])
    top_k = model.config.text_config.num_experts_per_tok
    chosen = torch.cat([torch.topk(torch.softmax(layer, -1), top_k, dim=-1).indices for layer in logits])
    share = torch.bincount(chosen.flatten(), minlength=4).float() / chosen.shape[0]
    torch.testing.assert_close(aux, 4 * (share * probs.mean(0)).sum())
    aux.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "self_attn" in name)
    # Layer 0's experts shape what layer 1's router sees: their LoRA factors get gradients from this loss too.
    layer0_experts = [g for name, g in grads.items() if "layers.0.mlp.experts" in name]
    assert len(layer0_experts) == 4 and all(g is not None and g.abs().sum() > 0 for g in layer0_experts)
    assert not any(
        p.requires_grad for name, p in model.named_parameters() if name.endswith(("gate.weight", "router.weight"))
    )


def test_mpo_on_a_moe_checkpoint_trains_the_experts_and_logs_the_load_balancing_loss(checkpoints, tmp_path):
    from ivl.demo.preference import write_preference_split
    from ivl.finetune.mpo import MPOConfig, run_mpo

    write_preference_split(tmp_path / "pairs", "train", 8, 112, 112)
    run_mpo(load_config(MPOConfig, None, [
        f"model.name_or_path={checkpoints['tiny-qwen3-moe']}",
        f"data.train={tmp_path / 'pairs' / 'train_preference.jsonl'}",
        "data.max_tiles=1", "data.use_thumbnail=false", "model.dtype=float32", "adapter.dropout=0", "optim.lr=5e-3",
        "optim.warmup_ratio=0", "loop.max_steps=2", "loop.log_every=1", "loop.num_workers=0", "loop.batch_size=4",
        f"loop.output_dir={tmp_path / 'run'}",
    ]))  # fmt: skip
    steps = [row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "rewards_accuracy" in row]  # fmt: skip
    assert [row["step"] for row in steps] == [1, 2] and all(row["router_aux_loss"] > 0 for row in steps)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(".experts." in key and "lora_B" in key and adapter[key].abs().sum() > 0 for key in adapter)
