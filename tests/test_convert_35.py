"""InternVL3.5 originals (Qwen3, Qwen3-MoE and GPT-OSS LLMs) <-> HF-native, and tied embeddings through a round trip.

As in test_convert.py, the original checkpoints are written from the layout description (InternVL3.5's remote code
holds transformers' own Qwen3 / Qwen3-MoE / GPT-OSS CausalLM as `language_model`, written by transformers 4.x: one
tensor per expert for Qwen3-MoE, fused 3-D experts with biases for GPT-OSS), never by the converter. The fused
Qwen3-MoE experts of the converted model are checked against transformers' own loading of the same files (its
conversion mapping fuses per-expert tensors) and against the per-expert layout restated here.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_convert import VIT, _assert_same_tensors, _files, original_config, original_shapes
from transformers import InternVLConfig, InternVLForConditionalGeneration

from ivl.model.convert import convert_checkpoint, load_original_model, save_model_as_original
from ivl.model.convert_config import ORIGINAL_CONFIG_KEY
from ivl.model.load import ModelLoadError, save_checkpoint
from ivl.model.presets import load_demo_tokenizer, preset_config

LLM = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=128, experts=4, expert_mlp=32, layers=2, vocab=576)
FAMILIES = ("qwen3", "qwen3_moe", "gpt_oss")


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


def llm_config_35(family: str) -> dict:
    """`llm_config` as InternVL3.5's published configs have it (Qwen3-8B, Qwen3-30B-A3B, gpt-oss-20b), shrunk."""
    sizes = {
        "hidden_size": LLM["hidden"], "num_attention_heads": LLM["heads"], "num_key_value_heads": LLM["kv_heads"],
        "head_dim": LLM["head_dim"], "num_hidden_layers": LLM["layers"], "vocab_size": LLM["vocab"],
        "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
        "torch_dtype": "bfloat16", "attention_dropout": 0.0, "eos_token_id": 522, "pad_token_id": 520,
    }  # fmt: skip
    if family == "gpt_oss":
        return {
            **sizes, "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
            "intermediate_size": LLM["expert_mlp"], "num_local_experts": LLM["experts"], "num_experts_per_tok": 2,
            "experts_per_token": 2, "initial_context_length": 4096, "max_position_embeddings": 131072,
            "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 128, "swiglu_limit": 7.0,
            "rms_norm_eps": 1e-05, "rope_theta": 150000, "router_aux_loss_coef": 0.9, "output_router_logits": False,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings":
                             4096, "rope_type": "yarn", "truncate": False},
        }  # fmt: skip
    qwen3 = {
        **sizes, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "bos_token_id": 1, "intermediate_size": LLM["mlp"], "max_position_embeddings": 40960,
        "max_window_layers": 36, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "use_sliding_window": False,
    }  # fmt: skip
    if family == "qwen3_moe":
        qwen3.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=LLM["expert_mlp"],
            norm_topk_prob=True,
            num_experts=LLM["experts"],
            num_experts_per_tok=2,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
            intermediate_size=96,
        )
    return qwen3


def original_config_35(family: str) -> dict:
    return {**original_config("qwen2"), "llm_config": llm_config_35(family), "template": "internvl2_5"}


def _llm_shapes_35(family: str) -> dict[str, tuple]:
    hidden, vocab, experts, expert_mlp = LLM["hidden"], LLM["vocab"], LLM["experts"], LLM["expert_mlp"]
    q_rows, kv_rows = LLM["heads"] * LLM["head_dim"], LLM["kv_heads"] * LLM["head_dim"]
    layer = {
        "self_attn.q_proj.weight": (q_rows, hidden), "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden), "self_attn.o_proj.weight": (hidden, q_rows),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
    }  # fmt: skip
    if family == "gpt_oss":  # attention biases and sinks; fused experts [E, H, 2I] (gate, up interleaved) with biases
        layer.update({
            "self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.bias": (kv_rows,), "self_attn.o_proj.bias": (hidden,), "self_attn.sinks": (LLM["heads"],),
            "mlp.router.weight": (experts, hidden), "mlp.router.bias": (experts,),
            "mlp.experts.gate_up_proj": (experts, hidden, 2 * expert_mlp),
            "mlp.experts.gate_up_proj_bias": (experts, 2 * expert_mlp),
            "mlp.experts.down_proj": (experts, expert_mlp, hidden), "mlp.experts.down_proj_bias": (experts, hidden),
        })  # fmt: skip
    else:  # QK-norm over head_dim
        layer.update({"self_attn.q_norm.weight": (LLM["head_dim"],), "self_attn.k_norm.weight": (LLM["head_dim"],)})
    if family == "qwen3":
        mlp = LLM["mlp"]
        layer.update({"mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
                      "mlp.down_proj.weight": (hidden, mlp)})  # fmt: skip
    if family == "qwen3_moe":  # the router is `mlp.gate`; one gate / up / down per expert
        layer["mlp.gate.weight"] = (experts, hidden)
        for e in range(experts):
            layer.update({f"mlp.experts.{e}.gate_proj.weight": (expert_mlp, hidden),
                          f"mlp.experts.{e}.up_proj.weight": (expert_mlp, hidden),
                          f"mlp.experts.{e}.down_proj.weight": (hidden, expert_mlp)})  # fmt: skip
    shapes = {
        "language_model.model.embed_tokens.weight": (vocab, hidden),
        "language_model.model.norm.weight": (hidden,),
    }
    shapes["language_model.lm_head.weight"] = (vocab, hidden)
    for i in range(LLM["layers"]):
        shapes.update({f"language_model.model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def write_original_35(path, family: str, tokenizer, seed: int = 0) -> dict:
    vision = {name: shape for name, shape in original_shapes("qwen2").items() if not name.startswith("language_model.")}
    vision["mlp1.1.weight"], vision["mlp1.1.bias"] = (LLM["hidden"], 4 * VIT["hidden"]), (LLM["hidden"],)
    vision["mlp1.3.weight"], vision["mlp1.3.bias"] = (LLM["hidden"], LLM["hidden"]), (LLM["hidden"],)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in {**vision, **_llm_shapes_35(family)}.items():
        offset = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")) else 0.0
        state[name] = (offset + (0.02 if len(shape) > 1 else 0.1) * torch.randn(shape, generator=generator)).bfloat16()
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(original_config_35(family), indent=2))
    (path / "modeling_internvl_chat.py").write_text("# the original's remote code travels along\n")
    tokenizer.save_pretrained(path)
    return state


def _batch(model):
    image_token = model.config.image_token_id
    return {
        "input_ids": torch.tensor([[5, 6] + [image_token] * 16 + [7, 8, 9, 10]]),
        "pixel_values": torch.randn(1, 3, VIT["image"], VIT["image"], generator=torch.Generator().manual_seed(0)),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_internvl35_original_to_hf_to_original_is_exact(tmp_path, tokenizer, family):
    state = write_original_35(tmp_path / "orig", family, tokenizer)
    assert convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf") == []
    assert convert_checkpoint(tmp_path / "hf", tmp_path / "back", to="original") == []
    _assert_same_tensors(_files(tmp_path / "orig"), _files(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == original_config_35(family)

    # transformers loads the converted files completely (fusing Qwen3-MoE's per-expert tensors by its own mapping),
    # and the loader that takes the original directly builds the same model.
    reference, info = InternVLForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    assert reference.config.text_config.model_type == family
    on_the_fly = load_original_model(tmp_path / "orig", torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected = reference(**_batch(reference)).logits
        torch.testing.assert_close(on_the_fly(**_batch(on_the_fly)).logits, expected, rtol=0, atol=0)
    if family == "qwen3_moe":  # fused [E, 2I, H] = per expert gate rows then up rows; down [E, H, I]
        experts = on_the_fly.model.language_model.layers[1].mlp.experts
        prefix = "language_model.model.layers.1.mlp.experts.2."
        gate, up, down = (state[prefix + name + ".weight"].float() for name in ("gate_proj", "up_proj", "down_proj"))
        assert torch.equal(experts.gate_up_proj[2], torch.cat([gate, up])) and torch.equal(experts.down_proj[2], down)


def _tiny_35_config(tokenizer, family: str, tied: bool = False) -> InternVLConfig:
    base = preset_config("tiny-112", tokenizer)
    text = llm_config_35(family)
    # What the HF config holds: no original-only keys (Qwen3-MoE's config class has no max_window_layers).
    original_only = ("architectures", "torch_dtype", "experts_per_token", "initial_context_length", "rope_scaling")
    original_only += ("max_window_layers",) if family == "qwen3_moe" else ()
    text = {key: value for key, value in text.items() if key not in original_only}
    text.update(vocab_size=base.text_config.vocab_size, tie_word_embeddings=tied)
    return InternVLConfig(
        vision_config=base.vision_config.to_dict(), text_config=text, image_token_id=base.image_token_id,
        image_seq_length=base.image_seq_length, tie_word_embeddings=tied,
    )  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_internvl35_hf_to_original_to_hf_is_exact(tmp_path, tokenizer, family):
    model = InternVLForConditionalGeneration(_tiny_35_config(tokenizer, family)).to(torch.bfloat16)
    save_checkpoint(model, tokenizer, tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "orig", to="original")
    convert_checkpoint(tmp_path / "orig", tmp_path / "back", to="hf")
    _assert_same_tensors(_files(tmp_path / "hf"), _files(tmp_path / "back"))
    before = json.loads((tmp_path / "hf" / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    after.pop(ORIGINAL_CONFIG_KEY)
    assert after == before
    original = json.loads((tmp_path / "orig" / "config.json").read_text())
    architecture = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}
    assert original["llm_config"]["architectures"] == [architecture[family]]
    names = set(_files(tmp_path / "orig"))
    if family == "qwen3_moe":
        assert "language_model.model.layers.1.mlp.experts.3.up_proj.weight" in names
    if family == "gpt_oss":
        assert "language_model.model.layers.1.mlp.experts.gate_up_proj_bias" in names


def test_in_memory_moe_model_is_written_per_expert_and_loads_back_equal(tmp_path, tokenizer):
    """`ivl merge --format original` writes a model from memory: its fused experts are split per expert."""
    model = InternVLForConditionalGeneration(_tiny_35_config(tokenizer, "qwen3_moe")).eval()
    save_model_as_original(model, tokenizer, tmp_path / "orig")
    names = set(_files(tmp_path / "orig"))
    assert "language_model.model.layers.0.mlp.experts.0.gate_proj.weight" in names
    assert not any(name.endswith("experts.gate_up_proj") for name in names)
    loaded = load_original_model(tmp_path / "orig", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_batch(loaded)).logits, model(**_batch(model)).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tied_embeddings_stay_tied_through_the_original_layout(tmp_path, tokenizer, family):
    if family == "qwen2":
        config = preset_config("tiny-112", tokenizer)
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    else:
        config = _tiny_35_config(tokenizer, family, tied=True)
    model = InternVLForConditionalGeneration(config).to(torch.bfloat16).eval()
    save_checkpoint(model, tokenizer, tmp_path / "hf")
    assert "language_model.lm_head.weight" not in _files(tmp_path / "hf")  # transformers saves the tied matrix once
    convert_checkpoint(tmp_path / "hf", tmp_path / "orig", to="original")
    original = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert original["llm_config"]["tie_word_embeddings"] is True
    assert "language_model.lm_head.weight" not in _files(tmp_path / "orig")
    convert_checkpoint(tmp_path / "orig", tmp_path / "back", to="hf")
    _assert_same_tensors(_files(tmp_path / "hf"), _files(tmp_path / "back"))
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    assert after["tie_word_embeddings"] is True and after["text_config"]["tie_word_embeddings"] is True
    loaded = load_original_model(tmp_path / "orig", torch.float32)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    reference = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        expected = reference(**_batch(reference)).logits
        torch.testing.assert_close(loaded(**_batch(loaded)).logits, expected, rtol=0, atol=0)


def test_mxfp4_gpt_oss_experts_are_refused_with_the_fix(tmp_path, tokenizer):
    state = write_original_35(tmp_path / "orig", "gpt_oss", tokenizer)
    name = "language_model.model.layers.0.mlp.experts.gate_up_proj"
    state[name + "_blocks"] = torch.zeros(4, 64, 2, 16, dtype=torch.uint8)  # gpt-oss's own MXFP4 layout
    state[name + "_scales"] = torch.zeros(4, 64, 2, dtype=torch.uint8)
    del state[name]
    save_file(state, tmp_path / "orig" / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"gate_up_proj_blocks: MXFP4-quantised experts.*dequantise"):
        convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf")


def test_in_memory_tied_model_is_written_tied(tmp_path, tokenizer):
    """`ivl merge --format original` of a tied model: the original says tied and holds the matrix once."""
    model = InternVLForConditionalGeneration(_tiny_35_config(tokenizer, "qwen3", tied=True)).eval()
    save_model_as_original(model, tokenizer, tmp_path / "orig")
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["llm_config"]["tie_word_embeddings"] is True
    assert "language_model.lm_head.weight" not in _files(tmp_path / "orig")
    loaded = load_original_model(tmp_path / "orig", torch.float32)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_batch(loaded)).logits, model(**_batch(model)).logits, rtol=0, atol=0)
