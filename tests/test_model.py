"""Model presets, loading from a local checkpoint, and the parts map."""

import json
import re

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from ivl.config import load_config
from ivl.model.load import ModelConfig, ModelLoadError, load_model, load_model_config, save_checkpoint, tokens_per_tile
from ivl.model.parts import PARTS, lora_target_regex, model_parts, part_of, unwrap, vision_layer_index
from ivl.model.presets import ZOO, demo_tokenizer_path, preset_config


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(name_or_path="preset:tiny-112"))


def test_zoo_presets_have_the_published_sizes():
    expected_billions = {"internvl3-1b": 0.94, "internvl3-2b": 2.09, "internvl3-8b": 7.94, "internvl2.5-26b": 25.5}
    for name, billions in expected_billions.items():
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(preset_config(name))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02), name
    assert all(tokens_per_tile(preset_config(name)) == 256 for name in ZOO)


def test_tiny_model_forward_uses_tokens_per_tile_from_its_config(tiny):
    model, tokenizer = tiny
    per_tile = tokens_per_tile(model.config)
    assert per_tile == 16  # 112 px tiles, patch 14 -> 8x8 -> pixel shuffle 0.5 -> 4x4
    image_token = model.config.image_token_id
    assert image_token == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    input_ids = torch.tensor([[1, 2] + [image_token] * per_tile * 3 + [3]])
    pixel_values = torch.randn(3, 3, 112, 112)
    logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert logits.shape == (1, input_ids.shape[1], model.config.text_config.vocab_size)


def test_local_checkpoint_round_trip_gives_identical_logits(tiny, tmp_path):
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    loaded, loaded_tokenizer = load_model(ModelConfig(name_or_path=str(tmp_path / "ckpt"), dtype="float32"))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert load_model_config(ModelConfig(name_or_path=str(tmp_path / "ckpt"))).image_token_id == 525
    input_ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_unconvertible_original_checkpoints_and_bad_paths_get_clear_errors(tmp_path):
    original = tmp_path / "orig"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    with pytest.raises(ModelLoadError, match=r"llm_config.architectures = \[None\]"):
        load_model(ModelConfig(name_or_path=str(original), tokenizer=str(demo_tokenizer_path())))
    with pytest.raises(ModelLoadError, match="nowhere: no such model folder"):  # never looked up on the hub
        load_model(ModelConfig(name_or_path=str(tmp_path / "nowhere")))


def test_parts_cover_every_parameter_exactly_once(tiny):
    model, _ = tiny
    parts = model_parts(model)
    counted = {part: 0 for part in PARTS}
    for name, parameter in model.named_parameters():
        counted[part_of(name)] += parameter.numel()
    assert counted["vision"] == sum(p.numel() for p in parts.vision.parameters())
    assert counted["projector"] == sum(p.numel() for p in parts.projector.parameters())
    assert counted["llm"] == sum(p.numel() for p in parts.llm.parameters()) + parts.lm_head.weight.numel()
    assert len(parts.vision_layers) == 2 and len(parts.llm_layers) == 2
    assert vision_layer_index("model.vision_tower.encoder.layer.1.mlp.fc1.weight") == 1
    assert vision_layer_index("model.vision_tower.embeddings.cls_token") is None
    assert part_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "llm"


@pytest.mark.parametrize("preset", ["tiny-112", "tiny-llama", "tiny-phi3"])
def test_lora_targets_are_scoped_per_part(preset):
    model, _ = load_model(ModelConfig(name_or_path=f"preset:{preset}"))
    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    llm_only = [name for name in linear_names if re.fullmatch(lora_target_regex(model, ("llm",)), name)]
    vision_only = [name for name in linear_names if re.fullmatch(lora_target_regex(model, ("vision",)), name)]
    assert llm_only and all(part_of(name) == "llm" for name in llm_only)
    assert "lm_head" not in llm_only
    assert vision_only and all(part_of(name) == "vision" for name in vision_only)
    # Every attention and MLP linear of the LLM layers is targeted (4 or 7 per layer depending on the family).
    per_layer = {"tiny-phi3": 4}.get(preset, 7)
    assert len(llm_only) == per_layer * 2
    assert len(vision_only) == 6 * 2


def test_llm_checkpointing_under_lora_does_not_backpropagate_through_the_frozen_vit():
    """PEFT hooks every input embedding (the ViT's patch embedding too) to output a tensor that requires grad when
    the model checkpoints: with a frozen ViT that made autograd run a whole ViT backward pass for nothing."""
    from ivl.finetune.options import SFTConfig
    from ivl.model.adapters import apply_trainability
    from ivl.training import enable_gradient_checkpointing

    config = load_config(
        SFTConfig,
        None,
        ["model.name_or_path=preset:tiny-112", "llm.gradient_checkpointing=true", "data.train=unused.jsonl"],
    )
    model, _ = load_model(config.model)
    enable_gradient_checkpointing(model, config)  # as the recipe does: before the adapters
    model = apply_trainability(model, config.modes(), config.vision, config.adapter)
    assert config.modes()["vision"] == "frozen"
    seen = []
    handle = model_parts(model).vision.register_forward_hook(lambda m, a, out: seen.append(out[0].requires_grad))
    try:
        model.train()
        pixels = torch.randn(1, 3, 112, 112)
        ids = torch.randint(1, 100, (1, 20))
        ids[0, 2:18] = unwrap(model).config.image_token_id
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    finally:
        handle.remove()
    assert seen == [False]
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
