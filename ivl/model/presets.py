"""Model presets: the InternVL zoo's shapes (configs only, no weights) and tiny models for tests and the demo.

`preset_config(name)` gives an `InternVLConfig`; `ivl.model.load` builds random-weight models from it. The zoo
presets let the planner and GPU benchmarks use real sizes without downloading; the `-hf` checkpoints themselves load
by hub id or path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, InternVLConfig, PreTrainedTokenizerBase

IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# Vision encoders (docs/design/model.md). Both use layer scale; 6B has RMSNorm + QK-norm and no qkv bias.
VISION = {
    "internvit-300m": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        norm_type="layer_norm", use_qk_norm=False, attention_bias=True,
    ),
    "internvit-6b": dict(
        hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
        norm_type="rms_norm", use_qk_norm=True, attention_bias=False,
    ),
}  # fmt: skip

# Language models, HF-native layouts (InternLM2 is LLaMA-structured once converted). InternVL checkpoints keep
# an untied lm_head even where the base LLM ties it (InternVL3-1B: 938M parameters).
QWEN_VOCAB, INTERNLM_VOCAB, QWEN3_VOCAB = 151674, 92553, 151936
# GPT-OSS's YaRN-scaled RoPE is defined for its 131,072-token window (the defaults of transformers' GptOssConfig).
GPT_OSS_ROPE = dict(max_position_embeddings=131072, rope_theta=150000.0)
LLM = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=QWEN_VOCAB),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=QWEN_VOCAB),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=QWEN_VOCAB),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=13824, vocab_size=QWEN_VOCAB),
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=QWEN_VOCAB),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=29568, vocab_size=QWEN_VOCAB),
    "internlm2-1.8b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=8, intermediate_size=8192, vocab_size=INTERNLM_VOCAB),
    "internlm2.5-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, intermediate_size=14336, vocab_size=INTERNLM_VOCAB),
    "internlm2.5-20b": dict(model_type="llama", hidden_size=6144, num_hidden_layers=48, num_attention_heads=48,
                            num_key_value_heads=8, intermediate_size=16384, vocab_size=INTERNLM_VOCAB),
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=8192, vocab_size=32064, rope_theta=10000.0),
    # InternVL3.5's LLMs: Qwen3 dense (head_dim 128, QK-norm), Qwen3-MoE (128 experts, 8 active) and GPT-OSS (32
    # experts, 4 active, attention sinks, sliding-window layers). Untied lm_head in every InternVL3.5 checkpoint.
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=QWEN3_VOCAB),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, vocab_size=QWEN3_VOCAB),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=QWEN3_VOCAB),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=QWEN3_VOCAB),
    "qwen3-14b": dict(model_type="qwen3", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, intermediate_size=17408, vocab_size=QWEN3_VOCAB),
    "qwen3-32b": dict(model_type="qwen3", hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, intermediate_size=25600, vocab_size=QWEN3_VOCAB),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, vocab_size=QWEN3_VOCAB),
    "qwen3-235b-a22b": dict(model_type="qwen3_moe", hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
                            num_experts=128, num_experts_per_tok=8, vocab_size=QWEN3_VOCAB),
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, num_hidden_layers=24, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, intermediate_size=2880, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, vocab_size=201088, **GPT_OSS_ROPE),
}  # fmt: skip

# image_token_id: 151667 for Qwen2-based, 92546 for InternLM2-based checkpoints (docs/design/original_checkpoints.md).
# For Phi-3 the id is whatever the checkpoint's tokenizer says; loading a real checkpoint always takes it from there.
ZOO = {
    "internvl3-1b": ("internvit-300m", "qwen2.5-0.5b", 151667),
    "internvl3-2b": ("internvit-300m", "qwen2.5-1.5b", 151667),
    "internvl3-8b": ("internvit-300m", "qwen2.5-7b", 151667),
    "internvl3-14b": ("internvit-300m", "qwen2.5-14b", 151667),
    "internvl3-38b": ("internvit-6b", "qwen2.5-32b", 151667),
    "internvl3-78b": ("internvit-6b", "qwen2.5-72b", 151667),
    "internvl2.5-2b": ("internvit-300m", "internlm2-1.8b", 92546),
    "internvl2.5-8b": ("internvit-300m", "internlm2.5-7b", 92546),
    "internvl2.5-26b": ("internvit-6b", "internlm2.5-20b", 92546),
    "mini-internvl-chat-2b-v1.5": ("internvit-300m", "internlm2-1.8b", 92546),
    "mini-internvl-chat-4b-v1.5": ("internvit-300m", "phi-3-mini", 32013),
    # InternVL3.5's -HF configs put <IMG_CONTEXT> at 151671 (Qwen3's vocabulary has more special tokens than Qwen2.5's).
    "internvl3.5-1b": ("internvit-300m", "qwen3-0.6b", 151671),
    "internvl3.5-2b": ("internvit-300m", "qwen3-1.7b", 151671),
    "internvl3.5-4b": ("internvit-300m", "qwen3-4b", 151671),
    "internvl3.5-8b": ("internvit-300m", "qwen3-8b", 151671),
    "internvl3.5-14b": ("internvit-300m", "qwen3-14b", 151671),
    "internvl3.5-38b": ("internvit-6b", "qwen3-32b", 151671),
    "internvl3.5-30b-a3b": ("internvit-300m", "qwen3-30b-a3b", 151671),
    "internvl3.5-241b-a28b": ("internvit-6b", "qwen3-235b-a22b", 151671),
    # GPT-OSS's InternVL tokens follow its 201,088-entry vocabulary's specials; the preset's id only places the
    # image token for random-weight models (a real checkpoint's id is read from its config and tokenizer).
    "internvl3.5-20b-a4b": ("internvit-300m", "gpt-oss-20b", 200021),
}

# Tiny models: 2 layers, hidden 32-64. `tiny` keeps real 448 px tiles (256 tokens per tile); `tiny-112` uses 112 px
# tiles (16 tokens per tile) so CPU demos and end-to-end tests run in seconds. Vocabulary and image token id come
# from the tokenizer they are built with.
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   norm_type="layer_norm", use_qk_norm=False, attention_bias=True)  # fmt: skip
TINY_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, tie_word_embeddings=False)  # fmt: skip
TINY = {
    "tiny": dict(image_size=448, text=dict(model_type="qwen2")),
    "tiny-112": dict(image_size=112, text=dict(model_type="qwen2")),
    "tiny-llama": dict(image_size=112, text=dict(model_type="llama")),
    "tiny-phi3": dict(image_size=112, text=dict(model_type="phi3", num_key_value_heads=4)),
    "tiny-6b-style": dict(image_size=112, vision=dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
                          text=dict(model_type="qwen2")),
    # InternVL3.5's LLM families (head_dim set: their configs default to the real models' 128 / 64).
    "tiny-qwen3": dict(image_size=112, text=dict(model_type="qwen3", head_dim=16)),
    "tiny-qwen3-moe": dict(image_size=112, text=dict(model_type="qwen3_moe", head_dim=16, num_experts=4,
                                                     num_experts_per_tok=2, moe_intermediate_size=32)),
    "tiny-gpt-oss": dict(image_size=112, text=dict(model_type="gpt_oss", head_dim=16, num_local_experts=4,
                                                   num_experts_per_tok=2, sliding_window=8, **GPT_OSS_ROPE)),
}  # fmt: skip

PRESETS = sorted([*ZOO, *TINY])


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> InternVLConfig:
    """The `InternVLConfig` of a preset. Tiny presets take vocabulary, special and image token ids from `tokenizer`."""
    if name in ZOO:
        vision_name, llm_name, token_id = ZOO[name]
        return _make_config(VISION[vision_name], dict(LLM[llm_name]), token_id, image_size=448)
    if name in TINY:
        if tokenizer is None:
            raise ValueError(f"tiny preset {name!r} is built for a tokenizer: pass one")
        spec = TINY[name]
        vision = {**TINY_VISION, **spec.get("vision", {})}
        text = {
            **TINY_LLM,
            **spec["text"],
            "vocab_size": -(-len(tokenizer) // 64) * 64,  # rounded up to a multiple of 64, as real checkpoints do
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
        return _make_config(vision, text, image_token_id, image_size=spec["image_size"])
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")


def _make_config(vision: dict[str, Any], text: dict[str, Any], image_token_id: int, image_size: int) -> InternVLConfig:
    vision = {**vision, "image_size": image_size, "patch_size": 14, "layer_norm_eps": 1e-6}
    text = {"max_position_embeddings": 32768, "rope_theta": 1_000_000.0, **text}
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        downsample_ratio=0.5,
        image_seq_length=tokens_per_tile_of(image_size, 14, 0.5),
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def tokens_per_tile_of(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """LLM tokens per tile: (image_size / patch)^2 patches, pixel-shuffled by downsample_ratio in each direction."""
    side = image_size // patch_size
    tokens = side * side * downsample_ratio * downsample_ratio
    if image_size % patch_size or not float(tokens).is_integer():
        raise ValueError(
            f"image_size {image_size} / patch {patch_size} / downsample {downsample_ratio} give a non-integer "
            f"token count per tile ({tokens})"
        )
    return int(tokens)


def demo_tokenizer_path() -> Path:
    """Directory of the small tokenizer shipped with the kit (built by `python -m ivl.demo.tokenizer`); the tiny
    presets use it."""
    return Path(str(resources.files("ivl") / "assets" / "demo_tokenizer"))


def load_demo_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo_tokenizer_path())
