"""Partial LoRA: the LLM's LoRA update only at image-token positions (layer by layer, whole model, mixed batches,
gradient checkpointing, QLoRA, KV-cache generation, save / load / resume, refusal to merge)."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from test_sft import tiny_run

from ivl.cli import main as cli_main
from ivl.config import ConfigError, load_config, to_dict
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.model.adapters import (
    DEFAULT_MODES,
    AdapterConfig,
    VisionPartConfig,
    apply_trainability,
    load_trained,
    merge_adapter,
    save_trained,
)
from ivl.model.checkpoint import CheckpointError, export_final
from ivl.model.load import ModelConfig, load_model
from ivl.model.partial_lora import MARKER_FILE, PartialLoraMergeError
from ivl.model.parts import model_parts, part_of

BASE = ModelConfig(name_or_path="preset:tiny-112", dtype="float32")


def partial_model(quantize_llm: bool = False, gradient_checkpointing: bool = False, **adapter):
    """tiny-112 with partial LoRA on the LLM (projector full, ViT frozen) and every lora_B random, so the update is
    non-zero wherever it applies."""
    base, tokenizer = load_model(BASE, quantize_llm=quantize_llm)
    if gradient_checkpointing:
        model_parts(base).llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)  # PEFT draws lora_A from the global RNG
    config = AdapterConfig(kind="partial_lora", r=4, alpha=8, dropout=0.0, qlora=quantize_llm, **adapter)
    model = apply_trainability(base, dict(DEFAULT_MODES), VisionPartConfig(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval(), tokenizer


def mixed_batch(image_token_id: int) -> dict[str, torch.Tensor]:
    """Row 0: 2 text tokens, one 16-token image, 4 text tokens; row 1: 22 text tokens, no image."""
    image_row = [1, 2, *[image_token_id] * 16, 5, 9, 33, 70]
    text_row = list(range(3, 25))
    pixel_values = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    return {"input_ids": torch.tensor([image_row, text_row]), "pixel_values": pixel_values}


def llm_lora_layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and part_of(n) == "llm"}


def record_updates(model) -> tuple[list, list]:
    """Forward hooks on every LLM LoRA layer recording (layer name, output - frozen output) per call."""
    updates, handles = [], []
    for name, layer in llm_lora_layers(model).items():

        def hook(module, args, output, name=name):
            updates.append((name, (output - module.base_layer(args[0])).detach()))

        handles.append(layer.register_forward_hook(hook))
    return updates, handles


def test_update_is_zero_at_every_text_position_of_every_layer_and_text_rows_equal_the_base():
    model, _ = partial_model()
    base, _ = load_model(BASE)
    batch = mixed_batch(base.config.image_token_id)
    is_image = batch["input_ids"] == base.config.image_token_id
    updates, handles = record_updates(model)
    with torch.no_grad():
        logits = model(**batch).logits
        expected = base(**batch).logits
    for handle in handles:
        handle.remove()
    assert len(updates) == 14  # 2 decoder layers x 7 linear layers, one call each
    for name, update in updates:
        assert torch.equal(update[~is_image], torch.zeros_like(update[~is_image])), name
        assert update[is_image].abs().amax(dim=-1).gt(0).all(), f"{name}: some image position got no update"
    # Whole model: the text-only row, and the image row's text before its image, equal the base exactly; the image
    # positions and everything after them (they attend to the image) differ.
    assert torch.allclose(logits[1], expected[1], atol=1e-6, rtol=0)
    assert torch.allclose(logits[0, :2], expected[0, :2], atol=1e-6, rtol=0)
    assert (logits[0, 2:] - expected[0, 2:]).abs().amax(dim=-1).gt(1e-3).all()


def test_inside_a_packed_row_the_text_only_sub_sample_equals_the_base_token_by_token():
    """Packing + partial LoRA: one packed row = [image sample | text-only sample], positions restarting, attention
    isolated per sub-sample: the text-only sub-sample (after the image one, so without isolation it would see the
    adapted image positions) equals the base model on it alone; the image positions and the text after them differ."""
    model, _ = partial_model()
    base, _ = load_model(BASE)
    batch = mixed_batch(base.config.image_token_id)
    image, text = batch["input_ids"][0], batch["input_ids"][1]
    packed = {
        "input_ids": torch.cat([image, text])[None],
        "position_ids": torch.cat([torch.arange(len(image)), torch.arange(len(text))])[None],
        "pixel_values": batch["pixel_values"],
        "use_cache": False,
    }  # no 2-D attention mask: transformers isolates the sub-samples from the restarting position ids
    with torch.no_grad():
        logits = model(**packed).logits[0]
        base_packed = base(**packed).logits[0]
        alone = base(input_ids=text[None]).logits[0]
    assert torch.allclose(logits[len(image) :], alone, atol=1e-6, rtol=0)
    assert torch.allclose(logits[:2], base_packed[:2], atol=1e-6, rtol=0)  # text before the image
    assert (logits[2 : len(image)] - base_packed[2 : len(image)]).abs().amax(dim=-1).gt(1e-3).all()


def test_text_only_prompts_equal_the_base_and_prompts_with_images_differ():
    model, _ = partial_model()
    base, _ = load_model(BASE)
    batch = mixed_batch(base.config.image_token_id)
    text_only = {"input_ids": batch["input_ids"][1:]}
    image_only = {"input_ids": batch["input_ids"][:1], "pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        assert torch.allclose(model(**text_only).logits, base(**text_only).logits, atol=1e-6, rtol=0)
        assert not torch.allclose(model(**image_only).logits, base(**image_only).logits, atol=1e-3)
        # Image-token ids without images in the call hold no image: they are text and get no update.
        unfed = {"input_ids": batch["input_ids"][:1]}
        assert torch.allclose(model(**unfed).logits, base(**unfed).logits, atol=1e-6, rtol=0)


def _gradients(gradient_checkpointing: bool) -> dict[str, torch.Tensor]:
    model, _ = partial_model(gradient_checkpointing=gradient_checkpointing)
    model.train()
    image_token = model.get_base_model().config.image_token_id
    first = mixed_batch(image_token)
    # A second pass with the image elsewhere before the single backward: each replay must use its own pass's mask.
    second_ids = torch.tensor([[1, *[image_token] * 16, 5, 9, 33, 70, 8]])
    second = {"input_ids": second_ids, "pixel_values": first["pixel_values"]}
    loss = model(**first).logits.square().mean() + 2 * model(**second).logits.square().mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and part_of(n) == "llm"}


def test_gradient_checkpointing_replays_each_pass_with_its_own_mask():
    plain, checkpointed = _gradients(False), _gradients(True)
    assert len(plain) == 28 and set(plain) == set(checkpointed)
    for name, gradient in plain.items():
        assert gradient.abs().max() > 0, name
        assert torch.allclose(checkpointed[name], gradient, atol=1e-6, rtol=0), name


def test_generation_with_kv_cache_equals_generation_without_and_new_tokens_get_no_update():
    model, _ = partial_model()
    image_token = model.get_base_model().config.image_token_id
    batch = mixed_batch(image_token)
    prompt = {"input_ids": batch["input_ids"][:1], "pixel_values": batch["pixel_values"]}
    options = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "suppress_tokens": [image_token]}
    updates, handles = record_updates(model)
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **options)
        new_token_updates = [update for _, update in updates if update.shape[1] == 1]
        uncached = model.generate(**prompt, use_cache=False, **options)
    for handle in handles:
        handle.remove()
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 6
    assert len(new_token_updates) == 5 * 14  # every decoding step after the prompt, every LoRA layer
    assert all(torch.equal(update, torch.zeros_like(update)) for update in new_token_updates)
    # The prompt pass did get the update (at its image tokens).
    assert any(update.abs().max() > 0 for _, update in updates if update.shape[1] > 1)


def test_qlora_base_keeps_text_rows_exact_and_trains():
    model, _ = partial_model(quantize_llm=True)
    layer = model.get_base_model().model.language_model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit" and type(layer.base_layer).__name__ == "Linear4bit"
    batch = mixed_batch(model.get_base_model().config.image_token_id)
    # Training first: bitsandbytes' CPU kernels repack 4-bit weights on the first no-grad forward, after which a
    # training forward through a biased 4-bit layer fails (a bitsandbytes CPU limitation, not partial LoRA's).
    model.train()
    model(**batch).logits.square().mean().backward()
    assert all(p.grad.abs().max() > 0 for n, p in model.named_parameters() if "lora_A" in n and part_of(n) == "llm")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        with model.disable_adapter():
            expected = model(**batch).logits
    assert torch.allclose(logits[1], expected[1], atol=1e-6, rtol=0)
    assert (logits[0, 2:] - expected[0, 2:]).abs().amax(dim=-1).gt(1e-3).all()


def _export(model, tokenizer, out_dir):
    info = {"recipe": "sft", "base_model": to_dict(BASE), "qlora": False, "adapter_kind": "partial_lora"}
    return export_final(out_dir, model, tokenizer, info, save_trained)


def test_saved_adapter_reloads_as_partial_lora_with_identical_outputs_and_refuses_to_merge(tmp_path, capsys):
    model, tokenizer = partial_model()
    out_dir = _export(model, tokenizer, tmp_path / "adapter")
    marker = json.loads((out_dir / MARKER_FILE).read_text())
    assert marker["kind"] == "partial_lora" and marker["image_token_id"] == model.get_base_model().config.image_token_id
    reloaded, _, _ = load_trained(out_dir)
    batch = mixed_batch(marker["image_token_id"])
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-6, rtol=0)
        # Without the marker PEFT loads ordinary LoRA: the text row would change. The marker is what keeps it exact.
        plain = PeftModel.from_pretrained(load_model(BASE)[0], out_dir).eval()
        assert not torch.allclose(plain(**batch).logits[1], expected[1], atol=1e-3)
    with pytest.raises(PartialLoraMergeError, match="cannot be merged"):
        merge_adapter(out_dir, tmp_path / "merged")
    capsys.readouterr()
    assert cli_main(["merge", "--adapter", str(out_dir), "--out", str(tmp_path / "merged")]) == 2
    assert "partial-LoRA adapter cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    with pytest.raises(PartialLoraMergeError):
        model.merge_and_unload()  # PEFT's own merge reaches the variant, which refuses too


def sft_config(shapes, out, *overrides):
    partial = [*tiny_run(shapes), "adapter.kind=partial_lora", "loop.batch_size=4"]
    return load_config(SFTConfig, None, [*partial, f"loop.output_dir={out}", *overrides])


def _losses(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_partial_lora_run_resumes_to_the_uninterrupted_result_and_keeps_text_exact(shapes, tmp_path):
    overrides = ("loop.max_steps=6", "loop.save_every=3", "loop.keep_last=5", "adapter.dropout=0.1")
    run_sft(sft_config(shapes, tmp_path, *overrides))
    uninterrupted = _losses(tmp_path)
    final_adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")  # a crash after step 3
    shutil.rmtree(tmp_path / "adapter")
    result = run_sft(sft_config(shapes, tmp_path, *overrides))
    resumed = _losses(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(again) == set(final_adapter)
    assert all(torch.allclose(final_adapter[k], again[k], atol=1e-6) for k in final_adapter)
    # The trained adapter is partial LoRA: text-only rows still equal the base exactly, image rows do not.
    model, _, info = load_trained(result.output)
    assert info["adapter_kind"] == "partial_lora" and (tmp_path / "adapter" / MARKER_FILE).is_file()
    base, _ = load_model(BASE)
    batch = mixed_batch(base.config.image_token_id)
    with torch.no_grad():
        logits, expected = model(**batch).logits, base(**batch).logits
    assert torch.allclose(logits[1], expected[1], atol=1e-6, rtol=0)
    assert not torch.allclose(logits[0], expected[0], atol=1e-3)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    with pytest.raises(CheckpointError, match="adapter_kind partial_lora -> lora"):
        run_sft(sft_config(shapes, tmp_path, *overrides, "adapter.kind=lora"))


def test_config_errors_say_what_to_change(shapes, tmp_path):
    with pytest.raises(ConfigError, match="llm.mode must be lora"):
        sft_config(shapes, tmp_path, "llm.mode=full")
    with pytest.raises(ConfigError, match="DoRA"):
        sft_config(shapes, tmp_path, "adapter.use_dora=true")
    with pytest.raises(ConfigError, match="adapter.kind.*'lora', 'partial_lora'"):
        sft_config(shapes, tmp_path, "adapter.kind=plora")
    with pytest.raises(ConfigError, match=r"adapter.llm_targets: \['w1'\] are not LoRA targets"):
        partial_model(llm_targets=["w1"])
    with pytest.raises(ConfigError, match=r"adapter.llm_layers: \[2\] outside this LLM's layers 0..1"):
        partial_model(llm_layers=[2])


def test_targets_and_layers_choose_the_adapted_linear_layers():
    model, _ = partial_model(llm_targets=["q_proj", "down_proj"], llm_layers=[1])
    prefix = "base_model.model.model.language_model.layers.1."
    assert set(llm_lora_layers(model)) == {prefix + "self_attn.q_proj", prefix + "mlp.down_proj"}
    updates, handles = record_updates(model)
    batch = mixed_batch(model.get_base_model().config.image_token_id)
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    is_image = batch["input_ids"] == model.get_base_model().config.image_token_id
    assert len(updates) == 2 and all(torch.equal(u[~is_image], torch.zeros_like(u[~is_image])) for _, u in updates)


def test_ivl_eval_and_chat_load_a_partial_lora_adapter(shapes, tmp_path, capsys):
    from accelerate import Accelerator

    from ivl.data.samples import DataConfig, SampleBuilder, SFTDataset, load_records
    from ivl.evaluate import answer_question, evaluate_loss

    model, tokenizer = partial_model()
    out_dir = _export(model, tokenizer, tmp_path / "adapter")
    data = DataConfig(validation=str(shapes / "validation.jsonl"), max_tiles=1, use_thumbnail=False)
    builder = SampleBuilder(tokenizer, model.get_base_model().config, data)
    dataset = SFTDataset(load_records(data.validation), builder)
    expected = evaluate_loss(model, dataset, Accelerator(), 8, tokenizer.pad_token_id, torch.float32)
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: {{validation: {data.validation}, max_tiles: 1, use_thumbnail: false}}\n")
    capsys.readouterr()
    assert cli_main(["eval", str(config), "--adapter", str(out_dir), "--json", "eval.exact_match_samples=0"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    image = str(shapes / "images" / "validation" / "000000.png")
    question = "What color is the circle?"
    answer = answer_question(model, builder, question, [image], max_new_tokens=4)
    assert cli_main(["chat", "--adapter", str(out_dir), "--image", image, "--max-new-tokens", "4", question]) == 0
    assert answer and capsys.readouterr().out.strip() == answer
