"""Multi-process training backends: FSDP2 on 2 CPU processes (gloo) equals one process, resumes exactly and exports
whole weights; refused backends say why; the shipped accelerate configs launch what they claim."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

from ivl.config import ConfigError, load_config
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.model.load import ModelConfig, load_model
from ivl.model.parts import layer_class_names, part_of
from ivl.runtime import _check_backend
from tests.helpers import tiny_run, torchrun

pytestmark = pytest.mark.slow
ACCELERATE_CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def _fsdp2(tmp_path: Path, out: Path, *overrides: str) -> None:
    """`ivl.finetune.sft` on 2 CPU processes under FSDP2 (tests/fsdp2_cpu.py), batch 2 each."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    driver = str(Path(__file__).parent / "fsdp2_cpu.py")
    torchrun(driver, str(config), *overrides, "loop.batch_size=2", f"loop.output_dir={out}",
             environment={"PYTHONPATH": str(Path(__file__).parent.parent)})  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_fsdp2_lora_equals_one_process_and_resumes_exactly(shapes, tmp_path):
    """Default modes (frozen ViT, full projector as modules_to_save, LoRA LLM): mixed requires_grad under FSDP2."""
    common = [*tiny_run(shapes), "loop.save_every=2", "loop.keep_last=5"]
    _fsdp2(tmp_path, tmp_path / "fsdp", *common)
    run_sft(load_config(SFTConfig, None, [*common, "loop.batch_size=4", f"loop.output_dir={tmp_path / 'one'}"]))
    sharded, one = _losses(tmp_path / "fsdp"), _losses(tmp_path / "one")
    assert len(one) == 4 and sharded == pytest.approx(one, abs=1e-5)
    # Checkpoints and the adapter hold whole tensors under the unsharded names, not one process's slice.
    for relative in ("checkpoints/step-000002/trainable.safetensors", "adapter/adapter_model.safetensors"):
        expected, got = load_file(tmp_path / "one" / relative), load_file(tmp_path / "fsdp" / relative)
        assert set(got) == set(expected) and any("multi_modal_projector" in name for name in got)
        for name, value in expected.items():
            assert got[name].shape == value.shape and torch.allclose(got[name], value, atol=1e-4), name
    final = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    # A crash after step 2: the resumed sharded run restores weights and optimizer state and repeats the losses.
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "fsdp" / "adapter")
    _fsdp2(tmp_path, tmp_path / "fsdp", *common)
    assert _losses(tmp_path / "fsdp") == pytest.approx(sharded, abs=1e-6)
    again = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(final[name], again[name], atol=1e-6) for name in final)


def test_fsdp2_full_training_exports_a_whole_model(shapes, tmp_path):
    _fsdp2(tmp_path, tmp_path / "fsdp", *tiny_run(shapes), "loop.max_steps=2", "stage=stage1.5")
    trained = dict(InternVLForConditionalGeneration.from_pretrained(tmp_path / "fsdp" / "model").named_parameters())
    base, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    before = dict(base.named_parameters())
    assert set(trained) == set(before) and all(trained[n].shape == p.shape for n, p in before.items())
    assert all(torch.equal(trained[n], p) for n, p in before.items() if part_of(n) == "llm")  # frozen
    assert any(not torch.equal(trained[n], p) for n, p in before.items() if part_of(n) == "vision")


def test_fsdp2_refuses_mid_run_evaluation(shapes, tmp_path, monkeypatch):
    class Fsdp2:
        is_fsdp2 = True

    monkeypatch.setattr("ivl.finetune.sft.make_accelerator", lambda loop, dtype: Fsdp2())
    config = load_config(SFTConfig, None, [*tiny_run(shapes), f"data.validation={shapes / 'validation.jsonl'}"])
    with pytest.raises(ConfigError, match="ivl eval"):
        run_sft(config)


class _Accelerator:
    def __init__(self, distributed_type: DistributedType, is_fsdp2: bool = False):
        self.distributed_type, self.is_fsdp2 = distributed_type, is_fsdp2


@pytest.mark.parametrize(
    "accelerator, message",
    [
        (_Accelerator(DistributedType.DEEPSPEED), "DeepSpeed is not supported"),
        (_Accelerator(DistributedType.FSDP), "fsdp_version: 2"),
    ],
)
def test_deepspeed_and_fsdp1_are_refused_with_the_way_out(accelerator, message):
    with pytest.raises(ConfigError, match=message):
        _check_backend(accelerator)
    _check_backend(_Accelerator(DistributedType.FSDP, is_fsdp2=True))
    _check_backend(_Accelerator(DistributedType.MULTI_GPU))


def test_fsdp2_shards_each_vit_and_llm_layer():
    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-llama", dtype="float32"))
    assert layer_class_names(model) == ["InternVLVisionLayer", "LlamaDecoderLayer"]


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2.yaml"])
def test_shipped_accelerate_configs_name_a_supported_backend(name):
    config = yaml.safe_load((ACCELERATE_CONFIGS / name).read_text())
    assert config["distributed_type"] in ("MULTI_GPU", "FSDP")
    if config["distributed_type"] == "FSDP":
        assert int(config["fsdp_config"]["fsdp_version"]) == 2
