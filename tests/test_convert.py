"""Original InternVL checkpoints <-> HF-native: layouts, round trips, loaders, training on a converted checkpoint.

The original-format checkpoints here are written from the layout description alone (literal original names, the
shapes InternVL's remote code creates, configs shaped like the published ones), never by the converter, and the
original computations (InternLM2 attention, InternViT layer, `mlp1`) are restated from InternVL's code, so the tests
check the converter against the original model rather than against itself.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration, LlamaConfig
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llama.modeling_llama import LlamaAttention

from ivl.cli import main as cli_main
from ivl.data.chat import NAMED_TEMPLATES
from ivl.model.convert import convert_checkpoint, join_wqkv, load_original_model, split_wqkv
from ivl.model.convert_config import ORIGINAL_CONFIG_KEY
from ivl.model.load import (
    ModelConfig,
    ModelLoadError,
    build_preset_model,
    load_model,
    load_model_config,
    load_tokenizer,
    save_checkpoint,
)
from ivl.model.presets import load_demo_tokenizer

VIT = dict(hidden=32, heads=2, mlp=64, layers=2, image=112, patch=14)
LLM = dict(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, vocab=576)
ROPE_THETA = 1_000_000.0


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


# --- original-format checkpoints, written from the layout description ------------------------------------------


def _llm_config(family: str) -> dict:
    """`llm_config` as published InternVL configs have it (InternVL2-8B for InternLM2), shrunk."""
    sizes = {
        "hidden_size": LLM["hidden"], "intermediate_size": LLM["mlp"], "num_attention_heads": LLM["heads"],
        "num_key_value_heads": LLM["kv_heads"], "num_hidden_layers": LLM["layers"], "vocab_size": LLM["vocab"],
        "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 522, "pad_token_id": 520,
    }  # fmt: skip
    if family == "internlm2":
        return {
            **sizes, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
            "attn_implementation": "flash_attention_2", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": ROPE_THETA,
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "_name_or_path": "internlm/internlm2_5-7b-chat", "transformers_version": "4.37.2",
        }  # fmt: skip
    if family == "qwen2":
        return {
            **sizes, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 32768,
            "max_window_layers": 70, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": ROPE_THETA,
            "sliding_window": None, "use_sliding_window": False, "attention_dropout": 0.0,
            "attn_implementation": "flash_attention_2", "_name_or_path": "./pretrained/Qwen2.5-7B-Instruct",
        }  # fmt: skip
    head_dim = LLM["hidden"] // LLM["heads"]
    return {  # Phi-3-mini-128k, as Mini-InternVL-Chat-4B-V1-5 has it
        **sizes, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "long_factor": [1.5 + i / 10 for i in range(head_dim // 2)],
                         "short_factor": [1.0 + i / 100 for i in range(head_dim // 2)]},
        "sliding_window": 262144, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
    }  # fmt: skip


def original_config(family: str) -> dict:
    templates = {"internlm2": "internlm2-chat", "qwen2": "internvl2_5", "phi3": "phi3-chat"}
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": VIT["image"],
        "llm_config": _llm_config(family), "max_dynamic_patch": 6, "min_dynamic_patch": 1,
        "model_type": "internvl_chat", "ps_version": "v2", "select_layer": -1, "template": templates[family],
        "torch_dtype": "bfloat16", "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.1, "dropout": 0.0,
            "hidden_act": "gelu", "hidden_size": VIT["hidden"], "image_size": VIT["image"], "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": VIT["mlp"], "layer_norm_eps": 1e-06,
            "model_type": "intern_vit_6b", "norm_type": "layer_norm", "num_attention_heads": VIT["heads"],
            "num_channels": 3, "num_hidden_layers": VIT["layers"], "patch_size": VIT["patch"],
            "qk_normalization": False, "qkv_bias": True, "use_flash_attn": True,
        },
    }  # fmt: skip


def _llm_shapes(family: str) -> dict[str, tuple]:
    hidden, mlp, vocab = LLM["hidden"], LLM["mlp"], LLM["vocab"]
    q_rows, kv_rows = hidden, LLM["kv_heads"] * hidden // LLM["heads"]
    if family == "internlm2":
        layer = {
            "attention.wqkv.weight": (q_rows + 2 * kv_rows, hidden), "attention.wo.weight": (hidden, hidden),
            "feed_forward.w1.weight": (mlp, hidden), "feed_forward.w3.weight": (mlp, hidden),
            "feed_forward.w2.weight": (hidden, mlp), "attention_norm.weight": (hidden,), "ffn_norm.weight": (hidden,),
        }  # fmt: skip
        top = {"model.tok_embeddings.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    elif family == "qwen2":
        layer = {
            "self_attn.q_proj.weight": (q_rows, hidden), "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.weight": (kv_rows, hidden), "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.weight": (kv_rows, hidden), "self_attn.v_proj.bias": (kv_rows,),
            "self_attn.o_proj.weight": (hidden, hidden), "mlp.gate_proj.weight": (mlp, hidden),
            "mlp.up_proj.weight": (mlp, hidden), "mlp.down_proj.weight": (hidden, mlp),
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        }  # fmt: skip
        top = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    else:  # phi3: fused q | k | v and gate | up, as transformers' Phi-3 keeps them
        layer = {
            "self_attn.qkv_proj.weight": (q_rows + 2 * kv_rows, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_up_proj.weight": (2 * mlp, hidden), "mlp.down_proj.weight": (hidden, mlp),
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        }  # fmt: skip
        top = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    shapes = {f"language_model.{name}": shape for name, shape in top.items()}
    shapes["language_model.model.norm.weight"] = (hidden,)
    for i in range(LLM["layers"]):
        shapes.update({f"language_model.model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def original_shapes(family: str) -> dict[str, tuple]:
    """Every parameter of InternVLChatModel (InternViT-300M style + mlp1 + the LLM), by its original name."""
    c, mlp, patches = VIT["hidden"], VIT["mlp"], (VIT["image"] // VIT["patch"]) ** 2
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, VIT["patch"], VIT["patch"]),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, patches + 1, c),
    }
    for i in range(VIT["layers"]):
        layer = {
            "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
            "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
            "mlp.fc1.weight": (mlp, c), "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (c, mlp), "mlp.fc2.bias": (c,),
            "norm1.weight": (c,), "norm1.bias": (c,), "norm2.weight": (c,), "norm2.bias": (c,),
            "ls1": (c,), "ls2": (c,),
        }  # fmt: skip
        shapes.update({f"vision_model.encoder.layers.{i}.{name}": shape for name, shape in layer.items()})
    d = LLM["hidden"]
    shapes.update({"mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,), "mlp1.1.weight": (d, 4 * c)})
    shapes.update({"mlp1.1.bias": (d,), "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,)})
    return {**shapes, **_llm_shapes(family)}


def write_original(path, family: str, tokenizer, seed: int = 0):
    """An original-format checkpoint directory: config.json, bf16 safetensors, the (demo) tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in original_shapes(family).items():
        scale = 0.02 if len(shape) > 1 else 0.1
        offset = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")) else 0.0
        state[name] = (offset + scale * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(original_config(family), indent=2))
    tokenizer.save_pretrained(path)
    return state


# --- restated original computations -----------------------------------------------------------------------------


def rope(x, cos, sin):
    """Rotary embedding as InternLM2 and LLaMA apply it (rotate_half)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rope_tables(length: int, head_dim: int, theta: float = ROPE_THETA):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def internlm2_attention(x, wqkv, wo, num_heads: int, num_kv_heads: int, cos, sin):
    """InternLM2Attention.forward: wqkv rows are, per kv head, [q_1 .. q_group, k, v] blocks of head_dim rows."""
    batch, length, hidden = x.shape
    head_dim, group = hidden // num_heads, num_heads // num_kv_heads
    qkv = (x @ wqkv.T).view(batch, length, num_kv_heads, group + 2, head_dim)  # 'b q (h gs d) -> b q h gs d'
    q = qkv[:, :, :, :group].reshape(batch, length, num_heads, head_dim).transpose(1, 2)
    k, v = qkv[:, :, :, -2].transpose(1, 2), qkv[:, :, :, -1].transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden) @ wo.T


def rms_norm(x, weight, eps: float):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def internvit_layer(x, p: dict, num_heads: int, eps: float = 1e-6):
    """InternVisionEncoderLayer.forward (naive attention): fused qkv as (3, heads, head_dim), layer scale ls1/ls2."""
    batch, length, c = x.shape
    h = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], eps)
    qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(batch, length, 3, num_heads, c // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attention = (((q * (c // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2)
    x = x + F.linear(attention.reshape(batch, length, c), p["attn.proj.weight"], p["attn.proj.bias"]) * p["ls1"]
    h = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], eps)
    mlp = F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return x + mlp * p["ls2"]


def _prefixed(state: dict, prefix: str) -> dict:
    return {name[len(prefix) :]: tensor.float() for name, tensor in state.items() if name.startswith(prefix)}


# --- tests -------------------------------------------------------------------------------------------------------


def _llama_attention(q, k, v, wo, x, num_heads: int, num_kv_heads: int, cos, sin):
    """transformers' LLaMA attention (eager) with the given q / k / v / o weights."""
    config = LlamaConfig(hidden_size=x.shape[-1], num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
    config._attn_implementation = "eager"
    attention = LlamaAttention(config, layer_idx=0)
    length = x.shape[1]
    causal = torch.zeros(length, length).masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    modules = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
    with torch.no_grad():
        for module, weight in zip(modules, (q, k, v, wo), strict=True):
            module.weight.copy_(weight)
        return attention(x, position_embeddings=(cos[None], sin[None]), attention_mask=causal[None, None])[0]


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (8, 1), (8, 2)])
def test_split_wqkv_reproduces_internlm2_attention(num_heads, num_kv_heads):
    hidden, length = 64, 7
    head_dim = hidden // num_heads
    generator = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    wqkv = torch.randn((num_heads + 2 * num_kv_heads) * head_dim, hidden, generator=generator) / 8
    wo = torch.randn(hidden, hidden, generator=generator) / 8
    x = torch.randn(2, length, hidden, generator=generator)
    cos, sin = rope_tables(length, head_dim)
    expected = internlm2_attention(x, wqkv, wo, num_heads, num_kv_heads, cos, sin)

    q, k, v = split_wqkv(wqkv, num_heads, num_kv_heads)
    got = _llama_attention(q, k, v, wo, x, num_heads, num_kv_heads, cos, sin)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if num_kv_heads > 1:  # the test tells layouts apart: reading wqkv as plain q | k | v rows gives another output
        naive = wqkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
        assert (_llama_attention(*naive, wo, x, num_heads, num_kv_heads, cos, sin) - expected).abs().max() > 1e-3
    # The layout functions are exact inverses, for weights and biases.
    assert torch.equal(join_wqkv(q, k, v, num_heads, num_kv_heads), wqkv)
    bias = torch.randn(wqkv.shape[0], generator=generator)
    assert torch.equal(join_wqkv(*split_wqkv(bias, num_heads, num_kv_heads), num_heads, num_kv_heads), bias)


def test_converted_internlm2_original_computes_what_the_original_computes(tmp_path, tokenizer):
    """ViT layer, projector and InternLM2 decoder layer of the converted model against the original computations."""
    state = write_original(tmp_path / "orig", "internlm2", tokenizer)
    model = load_original_model(tmp_path / "orig", torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = torch.randn(2, 65, VIT["hidden"], generator=generator)
        original = _prefixed(state, "vision_model.encoder.layers.1.")
        expected = internvit_layer(x, original, VIT["heads"])
        torch.testing.assert_close(model.model.vision_tower.encoder.layer[1](x), expected, atol=1e-5, rtol=1e-5)

        features = torch.randn(2, 16, 4 * VIT["hidden"], generator=generator)
        mlp1 = _prefixed(state, "mlp1.")
        h = F.layer_norm(features, (4 * VIT["hidden"],), mlp1["0.weight"], mlp1["0.bias"], 1e-5)
        expected = F.linear(F.gelu(F.linear(h, mlp1["1.weight"], mlp1["1.bias"])), mlp1["3.weight"], mlp1["3.bias"])
        torch.testing.assert_close(model.model.multi_modal_projector(features), expected, atol=1e-5, rtol=1e-5)

        # InternLM2DecoderLayer: attention_norm -> attention (wqkv, wo); ffn_norm -> w2(silu(w1 x) * w3 x).
        x = torch.randn(2, 9, LLM["hidden"], generator=generator)
        p = _prefixed(state, "language_model.model.layers.0.")
        cos, sin = rope_tables(9, LLM["hidden"] // LLM["heads"])
        attention = internlm2_attention(
            rms_norm(x, p["attention_norm.weight"], 1e-5), p["attention.wqkv.weight"], p["attention.wo.weight"],
            LLM["heads"], LLM["kv_heads"], cos, sin,
        )  # fmt: skip
        h = x + attention
        normed = rms_norm(h, p["ffn_norm.weight"], 1e-5)
        gated = F.silu(normed @ p["feed_forward.w1.weight"].T) * (normed @ p["feed_forward.w3.weight"].T)
        expected = h + gated @ p["feed_forward.w2.weight"].T
        causal = torch.zeros(9, 9).masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
        layer = model.model.language_model.layers[0]
        layer.self_attn.config._attn_implementation = "eager"
        got = layer(x, attention_mask=causal[None, None], position_embeddings=(cos[None], sin[None]))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    renamed = {
        "model.language_model.embed_tokens.weight": "language_model.model.tok_embeddings.weight",
        "lm_head.weight": "language_model.output.weight",
        "model.language_model.norm.weight": "language_model.model.norm.weight",
        "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
        "model.vision_tower.embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
        "model.vision_tower.embeddings.patch_embeddings.projection.weight": (
            "vision_model.embeddings.patch_embedding.weight"
        ),
    }
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[hf], state[original].float()) for hf, original in renamed.items())
    assert model.config.text_config.model_type == "llama"
    assert model.config.text_config.rope_parameters["rope_type"] == "dynamic"


def _files(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("family", ["internlm2", "qwen2", "phi3"])
def test_original_to_hf_to_original_is_exact(tmp_path, tokenizer, family):
    write_original(tmp_path / "orig", family, tokenizer)
    (tmp_path / "orig" / "modeling_internvl_chat.py").write_text("# the original's remote code travels along\n")
    assert convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf") == []
    assert convert_checkpoint(tmp_path / "hf", tmp_path / "back", to="original") == []
    _assert_same_tensors(_files(tmp_path / "orig"), _files(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == original_config(family)
    assert (tmp_path / "back" / "modeling_internvl_chat.py").is_file()
    # The HF side is a complete checkpoint: transformers loads it with every parameter present, the tiling settings
    # live in the image processor, the chat template and image token are carried.
    model, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.dtype == torch.bfloat16
    # The class the saved config names (GotOcr2ImageProcessor), in its PIL flavour: AutoImageProcessor would pick the
    # torchvision one, which transformers 5.17 cannot build without torchvision.
    assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["image_processor_type"] == (
        "GotOcr2ImageProcessor"
    )
    processor = GotOcr2ImageProcessorPil.from_pretrained(tmp_path / "hf")
    assert (processor.crop_to_patches, processor.min_patches, processor.max_patches) == (True, 1, 6)
    assert processor.size["height"] == VIT["image"]


@pytest.mark.parametrize(
    "preset, llm_arch",
    [("tiny-112", None), ("tiny-llama", "internlm2"), ("tiny-phi3", None), ("tiny-6b-style", None)],  # 6B: QK-norm
)
def test_hf_to_original_to_hf_is_exact(tmp_path, tokenizer, preset, llm_arch):
    model = build_preset_model(preset, tokenizer, dtype=torch.bfloat16)
    save_checkpoint(model, tokenizer, tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "orig", to="original", llm_arch=llm_arch)
    convert_checkpoint(tmp_path / "orig", tmp_path / "back", to="hf")
    # The converted checkpoint holds exactly what transformers' own save_pretrained wrote: names, dtypes, values.
    _assert_same_tensors(_files(tmp_path / "hf"), _files(tmp_path / "back"))
    before = json.loads((tmp_path / "hf" / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    after.pop(ORIGINAL_CONFIG_KEY)
    assert after == before
    original = json.loads((tmp_path / "orig" / "config.json").read_text())
    llm = {"tiny-llama": "InternLM2ForCausalLM", "tiny-phi3": "Phi3ForCausalLM"}.get(preset, "Qwen2ForCausalLM")
    assert original["llm_config"]["architectures"] == [llm]
    assert original["architectures"] == ["InternVLChatModel"] and original["ps_version"] == "v2"
    names = set(_files(tmp_path / "orig"))
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in names and "mlp1.3.weight" in names
    if preset == "tiny-6b-style":
        assert "vision_model.encoder.layers.1.attn.k_norm.weight" in names
        assert original["vision_config"]["qk_normalization"] and original["vision_config"]["norm_type"] == "rms_norm"
    if preset == "tiny-llama":
        assert {"language_model.model.layers.1.attention.wqkv.weight", "language_model.output.weight"} <= names
        assert json.loads((tmp_path / "orig" / "tokenizer_config.json").read_text())["chat_template"]


def test_loaders_take_original_checkpoints_directly(tmp_path, tokenizer):
    write_original(tmp_path / "orig", "internlm2", tokenizer)
    convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf")
    on_the_fly, loaded_tokenizer = load_model(ModelConfig(name_or_path=str(tmp_path / "orig"), dtype="float32"))
    reference = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    image_token = on_the_fly.config.image_token_id
    input_ids = torch.tensor([[5, 6] + [image_token] * 16 + [7, 8]])
    pixel_values = torch.randn(1, 3, VIT["image"], VIT["image"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(on_the_fly(input_ids=input_ids, pixel_values=pixel_values).logits, expected)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert load_model_config(ModelConfig(name_or_path=str(tmp_path / "orig"))).image_token_id == image_token
    # QLoRA quantises while loading, so the original goes through a temporary HF-native copy.
    quantized, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "orig")), quantize_llm=True)
    assert type(quantized.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # A tokenizer without a chat template gets the one the original config names.
    config_file = tmp_path / "orig" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": None}))
    (tmp_path / "orig" / "chat_template.jinja").unlink()
    templated = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "orig")))
    assert templated.chat_template == NAMED_TEMPLATES["internlm2-chat"].jinja


def test_sharded_output_and_pickle_needs_permission(tmp_path, tokenizer):
    state = write_original(tmp_path / "orig", "qwen2", tokenizer)
    convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf")  # loads the sharded checkpoint

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(state, pickled / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (pickled / name).write_bytes((tmp_path / "orig" / name).read_bytes())
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin is a pickle file.*--allow-pickle"):
        convert_checkpoint(pickled, tmp_path / "refused", to="hf")
    convert_checkpoint(pickled, tmp_path / "allowed", to="hf", allow_pickle=True)
    _assert_same_tensors(_files(tmp_path / "hf"), _files(tmp_path / "allowed"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ps_version": "v1"}, "pixel shuffle v2 only"),
        ({"use_llm_lora": 16}, "merge its LoRA weights first"),
        ({"force_image_size": 224}, "interpolates position embeddings"),
        ({"llm_config": {"architectures": ["MixtralForCausalLM"]}}, "MixtralForCausalLM"),
    ],
)
def test_unconvertible_originals_are_refused_with_the_reason(tmp_path, tokenizer, change, message):
    write_original(tmp_path / "orig", "qwen2", tokenizer)
    config = {**original_config("qwen2"), **change}
    (tmp_path / "orig" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf")


def test_unknown_parameters_are_refused_by_name(tmp_path, tokenizer):
    state = write_original(tmp_path / "orig", "qwen2", tokenizer)
    state["vision_model.encoder.layers.0.attn.extra_gate"] = torch.zeros(4)
    save_file(state, tmp_path / "orig" / "model.safetensors")
    with pytest.raises(ModelLoadError, match="attn.extra_gate: not a parameter"):
        convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf")


def test_cli_convert_and_its_errors(tmp_path, tokenizer, capsys):
    write_original(tmp_path / "orig", "phi3", tokenizer)
    assert cli_main(["convert", str(tmp_path / "orig"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "hf checkpoint written" in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf2"), "--to", "hf"]) == 2
    assert "already an hf checkpoint" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "orig"), "--to", "original"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "original"]) == 0
    _assert_same_tensors(_files(tmp_path / "orig"), _files(tmp_path / "back"))


def _internlm2_tokenizer_files(path, vocab_size: int) -> dict[str, int]:
    """InternLM2-style tokenizer files (remote-code class, sentencepiece model) on top of checkpoint `path`; returns
    the ids of InternVL's added tokens. `tokenizer.model` is written by the caller."""
    for name in ("tokenizer.json", "chat_template.jinja"):
        (path / name).unlink(missing_ok=True)
    added = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
    ids = {token: vocab_size + offset for offset, token in enumerate(added)}
    special = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<|im_start|>", 4: "<|im_end|>", **{v: k for k, v in ids.items()}}
    decoder = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for i, token in special.items()}  # fmt: skip
    config = {
        "added_tokens_decoder": decoder, "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *added],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "tokenizer_class": "InternLM2Tokenizer",
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


def test_internlm2_sentencepiece_tokenizer_becomes_a_fast_tokenizer_with_the_same_ids(tmp_path, tokenizer):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    import io
    import re

    write_original(tmp_path / "orig", "internlm2", tokenizer)
    model_file = io.BytesIO()
    text = ["What colour is the square? It is red.", "Describe the image in detail.", "你好，世界。图片里有什么？",
            "There are 3 circles and 2 triangles at the top left.\n\tdef f(x):\n        return x"] * 30  # fmt: skip
    # As InternLM2's: byte-fallback BPE, whitespace kept as is, no dummy prefix, chat markers in the vocabulary.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model_file, vocab_size=400, model_type="bpe", byte_fallback=True,
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "orig" / "tokenizer.model").write_bytes(model_file.getvalue())
    added = _internlm2_tokenizer_files(tmp_path / "orig", 400)
    assert convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf") == []
    converted = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "hf")))  # no remote code involved
    processor = spm.SentencePieceProcessor(model_proto=model_file.getvalue())
    specials = ["<|im_start|>", "<|im_end|>", *added]
    for sample in ["Hello world", "  two leading spaces", "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat is it?"
                   "<|im_end|>\n<|im_start|>assistant\n", "图片 🙂 x\n\tdef g(y):\n        return y"]:  # fmt: skip
        # InternLM2Tokenizer: <s>, then sentencepiece on each piece of text between special tokens.
        pieces = [piece for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", sample) if piece]
        expected = [1]
        for piece in pieces:
            expected += [converted.convert_tokens_to_ids(piece)] if piece in specials else processor.encode(piece)
        assert converted(sample).input_ids == expected, sample
        assert converted.decode(expected[1:]) == sample
    assert converted.convert_tokens_to_ids("<IMG_CONTEXT>") == added["<IMG_CONTEXT>"]
    assert converted.chat_template == NAMED_TEMPLATES["internlm2-chat"].jinja
    assert "auto_map" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())


def test_without_sentencepiece_the_internlm2_tokenizer_is_copied_and_said_so(tmp_path, tokenizer, monkeypatch):
    from ivl.model import convert_tokenizer

    monkeypatch.setattr(convert_tokenizer, "_missing_sentencepiece", lambda: ["sentencepiece", "protobuf"])
    write_original(tmp_path / "orig", "internlm2", tokenizer)
    (tmp_path / "orig" / "tokenizer.model").write_bytes(b"not read: only copied")
    added = _internlm2_tokenizer_files(tmp_path / "orig", LLM["vocab"] - 16)
    notes = convert_checkpoint(tmp_path / "orig", tmp_path / "hf", to="hf")
    assert len(notes) == 1 and "copied as it is" in notes[0] and "pip install sentencepiece protobuf" in notes[0]
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "orig" / name).read_bytes()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_token_id"] == added["<IMG_CONTEXT>"]
    with pytest.raises(ModelLoadError, match="needs sentencepiece and protobuf"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "orig")))
    notes = convert_checkpoint(tmp_path / "hf", tmp_path / "back", to="original")
    assert any("tokenizer copied as it is" in note for note in notes)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "orig" / name).read_bytes()


@pytest.mark.slow
def test_converted_original_trains_merges_and_converts_back(tmp_path, tokenizer, capsys):
    from test_sft import tiny_run

    from ivl.config import load_config
    from ivl.data.shapes import write_dataset
    from ivl.finetune.sft import SFTConfig, run_sft
    from ivl.model.adapters import load_trained

    write_original(tmp_path / "orig", "internlm2", tokenizer)
    write_dataset(tmp_path / "shapes", num_train=8, num_validation=4, width=112, height=112)
    overrides = [*tiny_run(tmp_path / "shapes"), f"model.name_or_path={tmp_path / 'orig'}", "loop.max_steps=2"]
    result = run_sft(load_config(SFTConfig, None, [*overrides, "loop.batch_size=4", f"loop.output_dir={tmp_path}/run"]))
    (tmp_path / "orig" / "modeling_internvl_chat.py").write_text("# the original's remote code travels along\n")
    merge = ["merge", "--adapter", result.output, "--out", str(tmp_path / "merged"), "--format", "original"]
    assert cli_main(merge) == 0
    assert (tmp_path / "merged" / "modeling_internvl_chat.py").is_file()  # carried from the base: nothing to note
    assert "note:" not in capsys.readouterr().err
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert merged_config["template"] == "internlm2-chat" and merged_config["vision_config"]["drop_path_rate"] == 0.1
    assert "language_model.model.layers.0.attention.wqkv.weight" in _files(tmp_path / "merged")

    adapter_model, _, _ = load_trained(result.output)
    merged, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "merged"), dtype="float32"))
    base, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "orig"), dtype="float32"))
    image_token = merged.config.image_token_id
    batch = {
        "input_ids": torch.tensor([[5, 6] + [image_token] * 16 + [7, 8, 9]]),
        "pixel_values": torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)),
    }
    with torch.no_grad():
        expected = adapter_model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)  # training did change the model
    assert convert_checkpoint(tmp_path / "merged", tmp_path / "merged-hf", to="hf") == []
    InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged-hf")


@pytest.mark.parametrize(
    "preset, family, rope, expected",
    [
        ("tiny-llama", "internlm2", {"rope_type": "dynamic", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}),
        ("tiny-phi3", "phi3", {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                               "original_max_position_embeddings": 4096, "partial_rotary_factor": 1.0},
         {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
        ("tiny-112", "qwen2", {"rope_type": "default"}, None),
    ],
)  # fmt: skip
def test_rope_scaling_is_written_as_the_original_code_reads_it(tokenizer, preset, family, rope, expected):
    """InternLM2 and InternVL's Phi-3 read `rope_scaling["type"]` (Phi-3: `su`, transformers 5 says `longrope`)."""
    from ivl.model.convert_config import original_config_from_hf
    from ivl.model.presets import preset_config

    config = preset_config(preset, tokenizer)
    config.text_config.rope_parameters = {**rope, "rope_theta": 10000.0}
    original = original_config_from_hf(config, family, {}, torch.bfloat16)
    assert original["llm_config"]["rope_scaling"] == expected
    assert original["llm_config"]["rope_theta"] == 10000.0
