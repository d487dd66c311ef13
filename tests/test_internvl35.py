"""InternVL3.5's LLM families (Qwen3, Qwen3-MoE, GPT-OSS): zoo sizes, LoRA targets, attention, partial LoRA."""

import re

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from ivl.config import ConfigError
from ivl.model.adapters import AdapterConfig, VisionPartConfig, apply_trainability
from ivl.model.load import ModelConfig, load_model, save_checkpoint
from ivl.model.parts import layer_class_names, lora_target_parameters, lora_target_regex, part_of
from ivl.model.presets import preset_config

FAMILIES = {"tiny-qwen3": "qwen3", "tiny-qwen3-moe": "qwen3_moe", "tiny-gpt-oss": "gpt_oss"}
LORA_LLM = {"vision": "frozen", "projector": "full", "llm": "lora"}

# The published InternVL3.5 sizes (billions, total and vision), as the model cards round them: to 0.1B.
PUBLISHED = {
    "internvl3.5-1b": (1.1, 0.3),
    "internvl3.5-2b": (2.3, 0.3),
    "internvl3.5-4b": (4.7, 0.3),
    "internvl3.5-8b": (8.5, 0.3),
    "internvl3.5-14b": (15.1, 0.3),
    "internvl3.5-38b": (38.4, 5.5),
    "internvl3.5-30b-a3b": (30.8, 0.3),
    "internvl3.5-241b-a28b": (240.7, 5.5),
    "internvl3.5-20b-a4b": (21.2, 0.3),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_internvl35_presets_have_the_published_sizes(name):
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(preset_config(name))
    total = sum(p.numel() for p in model.parameters()) / 1e9
    vision = sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e9
    published_total, published_vision = PUBLISHED[name]
    # Equal at the published precision; within 2% wherever that rounding itself is below 2% (from 4B up).
    assert round(total, 1) == published_total and round(vision, 1) == published_vision
    if published_total >= 4:
        assert total == pytest.approx(published_total, rel=0.02)
    assert model.config.image_token_id == preset_config(name).image_token_id


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    """A tiny InternVL checkpoint of each new LLM family, written by plain transformers (save_pretrained)."""
    model, tokenizer = load_model(ModelConfig(name_or_path=f"preset:{request.param}", dtype="float32"))
    path = tmp_path_factory.mktemp(request.param)
    save_checkpoint(model, tokenizer, path)
    return request.param, path


def test_checkpoints_load_by_path_with_the_attention_their_llm_needs(family_checkpoint):
    preset, path = family_checkpoint
    model, _ = load_model(ModelConfig(name_or_path=str(path), attn_implementation="sdpa"))
    assert model.config.text_config.model_type == FAMILIES[preset]
    # GPT-OSS's attention sinks: its LLM runs eager attention, the ViT keeps sdpa.
    assert model.config.text_config._attn_implementation == ("eager" if preset == "tiny-gpt-oss" else "sdpa")
    assert model.config.vision_config._attn_implementation == "sdpa"
    llm_layer = {"tiny-qwen3": "Qwen3DecoderLayer", "tiny-qwen3-moe": "Qwen3MoeDecoderLayer"}
    assert llm_layer.get(preset, "GptOssDecoderLayer") in layer_class_names(model)


def test_lora_targets_attention_mlp_and_experts_never_norms_or_router(family_checkpoint):
    preset, path = family_checkpoint
    model, _ = load_model(ModelConfig(name_or_path=str(path)))
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    targeted = [name for name in linear if re.fullmatch(lora_target_regex(model, ("llm",)), name)]
    per_layer = {"tiny-qwen3": 7}.get(preset, 4)  # MoE layers: attention only among linear layers
    assert len(targeted) == per_layer * 2 and all(part_of(name) == "llm" for name in targeted)
    assert not any("norm" in name or "router" in name or name.endswith(".gate") for name in targeted)
    experts = lora_target_parameters(model)
    if preset == "tiny-qwen3":
        assert experts == []
    else:
        assert experts == [f"model.language_model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                           for p in ("gate_up_proj", "down_proj")]  # fmt: skip
        router = "model.language_model.layers.1.mlp." + ("gate" if "qwen3" in preset else "router") + ".weight"
        assert lora_target_parameters(model, ("router",), (1,)) == [router]
        assert lora_target_regex(model, ("llm",), ("experts.down_proj",)) is None
    with pytest.raises(ConfigError, match="not LoRA targets"):
        lora_target_parameters(model, ("q_norm",))


def test_lora_trains_the_experts_and_leaves_norms_and_router_frozen(family_checkpoint):
    preset, path = family_checkpoint
    model, _ = load_model(ModelConfig(name_or_path=str(path), dtype="float32"))
    model = apply_trainability(model, LORA_LLM, VisionPartConfig(), AdapterConfig(dropout=0.0))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and part_of(name) == "llm"]
    assert all("lora_" in name for name in trainable)
    assert any(".experts." in name for name in trainable) == (preset != "tiny-qwen3")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any("q_norm" in name or "sinks" in name for name in frozen)
    assert not any(re.search(r"mlp\.(gate|router)\.(weight|bias)$", name) for name in trainable)


def test_partial_lora_changes_image_tokens_only(family_checkpoint):
    preset, path = family_checkpoint
    base, _ = load_model(ModelConfig(name_or_path=str(path), dtype="float32"))
    reference, _ = load_model(ModelConfig(name_or_path=str(path), dtype="float32"))
    adapter = AdapterConfig(kind="partial_lora", dropout=0.0)
    model = apply_trainability(base, {"vision": "frozen", "projector": "frozen", "llm": "lora"}, VisionPartConfig(),
                               adapter)  # fmt: skip
    assert not any(".experts." in name for name, _ in model.named_parameters() if "lora_" in name)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    image = model.config.image_token_id
    ids = torch.tensor([[1, 2] + [image] * 16 + [5, 9, 33]])
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = torch.tensor([[1, 2, 5, 9, 33, 40]])
        torch.testing.assert_close(model(input_ids=text).logits, reference(input_ids=text).logits)
        adapted, plain = model(input_ids=ids, pixel_values=pixels).logits, reference(input_ids=ids, pixel_values=pixels)
        assert not torch.allclose(adapted, plain.logits, atol=1e-3)
    if preset != "tiny-qwen3":  # expert LoRA changes fused weights: asking for it with partial LoRA is refused
        fresh, _ = load_model(ModelConfig(name_or_path=str(path), dtype="float32"))
        adapter = AdapterConfig(kind="partial_lora", llm_targets=["q_proj", "experts.down_proj"])
        with pytest.raises(ConfigError, match="image tokens"):
            apply_trainability(fresh, LORA_LLM, VisionPartConfig(), adapter)


def test_dry_run_shows_expert_adapters_and_default_dropout_is_refused_for_experts():
    from ivl.config import load_config
    from ivl.finetune.dry_run import dry_run
    from ivl.finetune.sft import SFTConfig

    common = ["data.train=unused.jsonl", "model.dtype=float32", "model.name_or_path=preset:tiny-qwen3-moe"]
    layout = dry_run(load_config(SFTConfig, None, [*common, "adapter.dropout=0"]))["layout"]["llm"]
    assert layout["targets"] == ["experts.down_proj", "experts.gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    attention_only = ["adapter.dropout=0.05", "adapter.llm_targets=[q_proj,v_proj]"]
    assert dry_run(load_config(SFTConfig, None, [*common, *attention_only]))["layout"]["llm"]["targets"] == [
        "q_proj",
        "v_proj",
    ]
    with pytest.raises(ConfigError, match="adapter.dropout=0.05: PEFT's LoRA on the fused expert weights"):
        dry_run(load_config(SFTConfig, None, [*common, "adapter.dropout=0.05"]))


def test_image_token_comes_from_the_checkpoint_and_a_mismatched_tokenizer_is_refused():
    from ivl.data.samples import DataConfig, SampleBuilder
    from ivl.model.presets import load_demo_tokenizer

    assert preset_config("internvl3.5-8b").image_token_id == 151671
    assert preset_config("internvl3-8b").image_token_id == 151667
    with pytest.raises(ConfigError, match="<IMG_CONTEXT> is id 525 but the model's config says image_token_id 151671"):
        SampleBuilder(load_demo_tokenizer(), preset_config("internvl3.5-8b"), DataConfig())


def test_internvl35_hub_ids_of_every_stage_are_known_offline():
    from ivl.model.load import model_config_of

    stages = {
        "InternVL3_5-30B-A3B-Instruct-HF": "qwen3_moe",
        "InternVL3_5-8B-MPO-HF": "qwen3",
        "InternVL3_5-2B-HF": "qwen3",
    }
    for hub_id, family in stages.items():
        config = model_config_of(ModelConfig(name_or_path=f"OpenGVLab/{hub_id}"))
        assert config.text_config.model_type == family and config.image_token_id == 151671
