"""Model presets, loading from a local checkpoint, and the parts map."""

import json
import re

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from ivl.model.load import ModelConfig, ModelLoadError, load_model, load_model_config, save_checkpoint, tokens_per_tile
from ivl.model.parts import PARTS, lora_target_regex, model_parts, part_of, vision_layer_index
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
