"""The SFT recipe end to end on a tiny model: trainability per part, resume, merge, eval, bad data."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from ivl.cli import main as cli_main
from ivl.config import ConfigError, load_config
from ivl.data.chat import SampleError
from ivl.finetune.sft import SFTConfig, enable_gradient_checkpointing, run_sft
from ivl.model.adapters import load_trained, merge_adapter
from ivl.model.checkpoint import CheckpointError
from ivl.model.load import ModelConfig, load_model
from ivl.model.parts import model_parts, part_of
from tests.helpers import tiny_run, torchrun

pytestmark = pytest.mark.slow


def sft_config(shapes, out, *overrides):
    base = [*tiny_run(shapes), f"data.validation={shapes / 'validation.jsonl'}", "loop.batch_size=4"]
    return load_config(SFTConfig, None, [*base, f"loop.output_dir={out}", *overrides])


def base_state():
    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def trained_state(model):
    """Effective weights by base name (LoRA merged, modules_to_save copies in place of the originals)."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return {name: p.detach() for name, p in merged.named_parameters()}


@pytest.mark.parametrize(
    "overrides, changed_parts",
    [
        ((), {"projector", "llm"}),  # default: frozen ViT, full projector, LoRA LLM
        (("stage=stage1",), {"projector"}),
        (("vision.mode=lora", "projector.mode=frozen", "llm.mode=frozen", "stage=none"), {"vision"}),
    ],
)
def test_frozen_parts_stay_byte_identical_and_trained_parts_change(shapes, tmp_path, overrides, changed_parts):
    before = base_state()
    result = run_sft(sft_config(shapes, tmp_path, *overrides))
    model, _, info = load_trained(result.output)
    after = trained_state(model)
    assert set(after) == set(before)
    for name, value in before.items():
        if part_of(name) in changed_parts and name.endswith("weight") and value.ndim == 2:
            continue  # checked per part below
        if part_of(name) not in changed_parts:
            assert torch.equal(after[name], value), f"{name} ({part_of(name)}) changed but its part is frozen"
    for part in changed_parts:
        assert any(not torch.equal(after[n], v) for n, v in before.items() if part_of(n) == part), part
    assert {part for part, mode in info["modes"].items() if mode != "frozen"} == changed_parts


def test_unfreeze_last_vision_layers_trains_only_those(shapes, tmp_path):
    before = base_state()
    result = run_sft(sft_config(shapes, tmp_path, "vision.unfreeze_last_layers=1"))
    after = trained_state(load_trained(result.output)[0])
    vision_changed = {n for n, v in before.items() if part_of(n) == "vision" and not torch.equal(after[n], v)}
    assert vision_changed and all(".encoder.layer.1." in name for name in vision_changed)


def test_full_training_without_lora_saves_a_whole_model(shapes, tmp_path):
    result = run_sft(sft_config(shapes, tmp_path, "stage=stage1.5"))
    assert result.output.endswith("model")
    reloaded = InternVLForConditionalGeneration.from_pretrained(result.output)
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(result.output)  # the processor files travel with it
    assert image_processor.size["height"] == 112 and image_processor.max_patches == 1  # tiny-112, data.max_tiles=1
    # Loading the run's output with an explicit base config still loads the trained weights, not the base.
    with_base, _, _ = load_trained(result.output, ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    assert all(torch.equal(p, dict(with_base.named_parameters())[n]) for n, p in reloaded.named_parameters())
    before = base_state()
    after = dict(reloaded.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items() if part_of(n) == "llm")
    assert any(not torch.equal(after[n], v) for n, v in before.items() if part_of(n) == "vision")


def test_stage_and_explicit_mode_conflict_is_a_config_error(shapes, tmp_path):
    with pytest.raises(ConfigError, match="contradicts stage stage1"):
        sft_config(shapes, tmp_path, "stage=stage1", "llm.mode=lora")
    with pytest.raises(ConfigError, match="nothing would train"):
        sft_config(shapes, tmp_path, "vision.mode=frozen", "projector.mode=frozen", "llm.mode=frozen")


def test_resumed_run_reproduces_the_uninterrupted_losses(shapes, tmp_path):
    overrides = ("loop.max_steps=6", "loop.save_every=3", "loop.keep_last=5", "adapter.dropout=0.1")
    run_sft(sft_config(shapes, tmp_path, *overrides))
    uninterrupted = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    final_adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # Simulate a crash after step 3: the later checkpoint and the final adapter never got written.
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "adapter")
    (tmp_path / "checkpoints" / ".step-000006.tmp").mkdir()  # a half-written checkpoint is ignored
    run_sft(sft_config(shapes, tmp_path, *overrides))
    resumed = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(final_adapter[k], again[k], atol=1e-6) for k in final_adapter)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    with pytest.raises(CheckpointError, match="batch_size 4 -> 2"):
        run_sft(sft_config(shapes, tmp_path, *overrides, "loop.batch_size=2"))


def _image_batch(model):
    image_token = model.config.image_token_id
    ids = torch.cat([torch.tensor([[1, 2]]), torch.full((1, 16), image_token), torch.tensor([[5, 9, 33, 70]])], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))}


def test_merged_model_equals_adapter_model_and_reloads_with_plain_transformers(shapes, tmp_path):
    result = run_sft(sft_config(shapes, tmp_path / "run"))
    adapter_model, _, _ = load_trained(result.output)
    merge_adapter(result.output, tmp_path / "merged")
    merged = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    base, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    batch = _image_batch(merged)
    with torch.no_grad():
        expected = adapter_model(**batch).logits
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)  # the adapter did change the model
        generated = merged.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] >= batch["input_ids"].shape[1] + 1


def test_qlora_trains_and_merges_into_the_dequantised_base(shapes, tmp_path):
    # An evaluation between the steps: on CPUs with AVX512-BF16, bitsandbytes would repack the 4-bit weights for
    # inference there and the next backward would fail (ivl.model.quantize.keep_training_layout).
    result = run_sft(
        sft_config(shapes, tmp_path / "run", "adapter.qlora=true", "loop.max_steps=2", "loop.eval_every=1")
    )
    adapter_model, _, info = load_trained(result.output)
    assert info["qlora"] is True
    assert type(adapter_model.get_base_model().model.language_model.layers[0].mlp.up_proj.base_layer).__name__ == (
        "Linear4bit"
    )
    merge_adapter(result.output, tmp_path / "merged")
    merged = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    # The reference: the same adapter, unmerged, on the dequantised 4-bit base.
    quantized, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"), quantize_llm=True)
    from peft import PeftModel

    reference = PeftModel.from_pretrained(quantized.dequantize(), result.output)
    batch = _image_batch(merged)
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        assert torch.allclose(merged_logits, reference(**batch).logits, atol=1e-4)
        # And close to the trained QLoRA model itself (its CPU 4-bit matmul rounds slightly differently).
        assert (merged_logits - adapter_model(**batch).logits).abs().max() < 1e-2  # measured: 2.9e-3


def test_bad_rows_fail_before_training_or_are_skipped_and_counted(shapes, tmp_path):
    bad = tmp_path / "train.jsonl"
    rows = (shapes / "train.jsonl").read_text().splitlines()
    broken = json.loads(rows[2])
    broken["image"] = "images/train/missing.png"
    bad.write_text("\n".join([rows[0], rows[1], json.dumps(broken), *rows[3:]]) + "\n")
    (tmp_path / "images").symlink_to(shapes / "images")
    with pytest.raises(SampleError, match=r"train.jsonl:3"):
        run_sft(sft_config(shapes, tmp_path / "fail", f"data.train={bad}"))
    assert not (tmp_path / "fail" / "metrics.jsonl").exists()  # failed before the first step
    result = run_sft(
        sft_config(shapes, tmp_path / "skip", f"data.train={bad}", "data.on_error=skip", "loop.max_steps=6")
    )
    assert result.metrics["skipped_rows"] == 1


def test_cli_eval_reports_token_weighted_loss_and_exact_match(shapes, tmp_path, capsys):
    result = run_sft(sft_config(shapes, tmp_path / "run", "eval.exact_match_samples=8"))
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: {{validation: {shapes / 'validation.jsonl'}, max_tiles: 1, use_thumbnail: false}}\n")
    capsys.readouterr()
    assert cli_main(["eval", str(config), "--adapter", result.output, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5)
    assert report["tokens"] == result.metrics["eval_tokens"] > 0
    assert report["samples"] == 8
    assert report["exact_match"] == pytest.approx(result.metrics["eval_exact_match"])


def _run_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _summary(stdout: str) -> dict:
    """The run summary a launcher printed last (after the setup's own lines)."""
    return json.loads(stdout[stdout.rindex('{\n  "output"') :])


@pytest.mark.parametrize("reduction", ["token", "square"])
def test_two_processes_match_one_process_with_the_same_global_batch(shapes, tmp_path, reduction, capsys):
    """2 CPU processes x batch 2 == 1 process x batch 4 == 1 process x batch 2 x 2 accumulation steps, for the token
    and the square loss reduction (global weight denominators)."""
    common = [*tiny_run(shapes), f"loss.reduction={reduction}"]
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    completed = torchrun("-m", "ivl.finetune.sft", str(config), *common, "loop.batch_size=2",
                         f"loop.output_dir={tmp_path / 'ddp'}")  # fmt: skip
    capsys.readouterr()
    assert cli_main(["sft", str(config), *common, "loop.batch_size=4", f"loop.output_dir={tmp_path / 'one'}"]) == 0
    # Every way of launching prints the same summary: the output directory and the last metrics.
    single, multi = _summary(capsys.readouterr().out), _summary(completed.stdout)
    assert (multi["output"], single["output"]) == (str(tmp_path / "ddp" / "adapter"), str(tmp_path / "one" / "adapter"))
    assert set(multi) == set(single) and multi["loss"] == pytest.approx(single["loss"], abs=1e-5)
    run_sft(
        load_config(
            SFTConfig, None, [*common, "loop.batch_size=2", "loop.grad_accum=2", f"loop.output_dir={tmp_path / 'acc'}"]
        )
    )
    one, ddp, accumulated = (_run_losses(tmp_path / name) for name in ("one", "ddp", "acc"))
    assert len(one) == 4
    assert ddp == pytest.approx(one, abs=1e-5)
    assert accumulated == pytest.approx(one, abs=1e-5)


def test_gradient_checkpointing_gives_the_same_losses(shapes, tmp_path):
    plain = run_sft(sft_config(shapes, tmp_path / "plain", "stage=stage2", "optim.lr=1e-3"))
    checkpointed = run_sft(
        sft_config(
            shapes,
            tmp_path / "ckpt",
            "stage=stage2",
            "optim.lr=1e-3",
            "vision.gradient_checkpointing=true",
            "llm.gradient_checkpointing=true",
        )
    )
    assert _run_losses(tmp_path / "ckpt") == pytest.approx(_run_losses(tmp_path / "plain"), abs=1e-5)
    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-112"))
    enable_gradient_checkpointing(model, sft_config(shapes, tmp_path, "llm.gradient_checkpointing=true"))
    assert all(layer.gradient_checkpointing for layer in model_parts(model).llm_layers)
    assert not any(layer.gradient_checkpointing for layer in model_parts(model).vision_layers)
    assert checkpointed.metrics["eval_loss"] == pytest.approx(plain.metrics["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/sft/*.yaml")), ids=lambda p: p.name)
def test_shipped_sft_configs_are_valid(path):
    config = load_config(SFTConfig, path)
    assert config.model.name_or_path.startswith("OpenGVLab/") and config.model.name_or_path.endswith(("-hf", "-HF"))


@pytest.mark.parametrize("reduction, p", [("token", 0.0), ("square", 0.5)])
def test_first_step_loss_is_the_reduction_formula_over_the_whole_batch(shapes, tmp_path, reduction, p):
    """One step over all 24 rows at once: the logged loss is sum_s x_s^-p * CE_s / sum_s x_s^(1-p), CE_s the summed
    cross-entropy of sample s's x_s supervised next tokens under the base model (LoRA starts as a no-op), restated
    from a plain forward with full logits. The denominator is the weight sum, which is the token count only for
    reduction=token. fp32 on both sides, summation order only: 1e-5 relative."""
    from ivl.data.samples import SampleBuilder, SFTDataset, collate, load_records, model_inputs

    config = sft_config(shapes, tmp_path, "loop.batch_size=24", "loop.max_steps=1", f"loss.reduction={reduction}")
    run_sft(config)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in logged if r.get("step") == 1 and "loss" in r)

    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    builder = SampleBuilder(tokenizer, model.config, config.data)
    dataset = SFTDataset(load_records(config.data.train), builder)
    batch = collate([dataset[i] for i in range(len(dataset))], tokenizer.pad_token_id)
    inputs = model_inputs(batch)
    labels = inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs).logits.double()
    targets = labels[:, 1:]
    supervised = targets != -100
    nll = -(logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * supervised)
    per_sample, tokens = nll.sum(1), supervised.sum(1).double()
    assert len(set(tokens.tolist())) > 1  # samples of different lengths: the reductions differ
    expected = (per_sample * tokens.pow(-p)).sum() / tokens.pow(1 - p).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
