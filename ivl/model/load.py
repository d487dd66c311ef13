"""Load an InternVL model and its tokenizer from a hub id, a local path, or a preset.

    model, tokenizer = load_model(ModelConfig(name_or_path="OpenGVLab/InternVL3-1B-hf", dtype="bfloat16"))
    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112"))   # random weights, demo tokenizer

Real checkpoints load through `InternVLForConditionalGeneration.from_pretrained` (safetensors only, remote code off
unless asked for). An original-format checkpoint (remote-code `InternVLChatModel`, `config.json` with `llm_config`)
is converted to the HF-native layout while loading (`ivl.model.convert`). Presets build random-weight models: tiny
ones for tests and the demo, zoo ones at real size for GPU benchmarks and the memory planner.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerBase

from ivl.errors import ModelLoadError  # noqa: F401  re-exported
from ivl.model.checkpoint import TRAINING_INFO
from ivl.model.parts import attention_implementation
from ivl.model.presets import IMAGE_CONTEXT_TOKEN, demo_tokenizer_path, preset_config
from ivl.model.presets import tokens_per_tile_of as _tokens_per_tile_of
from ivl.options import ModelConfig

PRESET_PREFIX = "preset:"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `name` or `owner/name`
# InternVL3.5 ships each size in four training stages (InternVL3_5-8B-Pretrained / -Instruct / -MPO / final).
STAGE_SUFFIXES = ("-Pretrained", "-Instruct", "-MPO")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[dtype]


def preset_name(name_or_path: str) -> str | None:
    return name_or_path[len(PRESET_PREFIX) :] if name_or_path.startswith(PRESET_PREFIX) else None


def is_local_path(name_or_path: str) -> bool:
    """Whether a model name means a folder on this machine, never to be looked up on the hub: it exists, starts with
    `/`, `.` or `~`, or has a path separator but is not a hub id (`owner/name`)."""
    if preset_name(name_or_path) is not None:
        return False
    if name_or_path.startswith(("/", ".", "~")) or Path(name_or_path).expanduser().exists():
        return True
    return os.sep in name_or_path and not HUB_ID.fullmatch(name_or_path)


def adapter_base(adapter_dir: str | Path) -> str:
    """Which base an adapter folder says it was trained on: the run's ivl_training.json, else PEFT's record."""
    adapter_dir = Path(adapter_dir)
    found = []
    for name, read in (
        (TRAINING_INFO, lambda info: (info.get("base_model") or {}).get("name_or_path")),
        ("adapter_config.json", lambda info: info.get("base_model_name_or_path")),
    ):
        try:
            value = read(json.loads((adapter_dir / name).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            found.append(f"{value} ({name})")
    return ", ".join(dict.fromkeys(found)) or f"not recorded (no base in {TRAINING_INFO} or adapter_config.json)"


def _check_local_model(name_or_path: str) -> None:
    """A local base must be a model folder: not missing, not an adapter (refused with the options that take one)."""
    if not is_local_path(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "no such model folder"
        raise ModelLoadError(f"{name_or_path}: {what} (a local path is never looked up on the hub)")
    if (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{name_or_path} is a LoRA adapter folder, not a base model: set model.name_or_path to its base "
            f"[{adapter_base(path)}] and pass the adapter as --adapter / eval.adapter (ivl eval, ivl chat), "
            "mpo.init_adapter (continue it with MPO) or ivl merge --adapter (fold it into the base)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path}: no config.json, so not a model checkpoint folder")


def _original_checkpoint(name_or_path: str) -> Path | None:
    """The directory, when `name_or_path` is a local original-format checkpoint."""
    from ivl.model.convert import is_original_checkpoint

    path = Path(name_or_path)
    return path if not preset_name(name_or_path) and path.is_dir() and is_original_checkpoint(path) else None


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    source = config.tokenizer or (
        str(demo_tokenizer_path()) if preset_name(config.name_or_path) else config.name_or_path
    )
    original = _original_checkpoint(source)
    if original is not None:
        from ivl.model.convert import read_checkpoint_config
        from ivl.model.convert_tokenizer import load_original_tokenizer

        template = read_checkpoint_config(original).get("template")
        return load_original_tokenizer(original, template, config.trust_remote_code)
    if is_local_path(source) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"{source}: no such tokenizer folder (a local path is never looked up on the hub)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=config.trust_remote_code, local_files_only=is_local_path(source)
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a tokenizer from {source!r}: {error}") from error
    if "<IMG_CONTEXT>" not in tokenizer.get_vocab():
        raise ModelLoadError(f"tokenizer {source!r} has no <IMG_CONTEXT> token: it is not an InternVL tokenizer")
    return tokenizer


def build_preset_model(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    dtype=torch.float32,
    attn_implementation="sdpa",
    device: torch.device | str | None = None,
):
    """A random-weight model of preset `name` (deterministic for a given seed and device).

    Its `<IMG_CONTEXT>` id is `tokenizer`'s: random weights know no token, and the data must find the image positions
    with the tokenizer the run uses (a zoo preset's real id is beyond the demo tokenizer's vocabulary). On a CUDA
    `device` the weights are drawn there: initialising an 8B model on the host takes minutes, on the GPU seconds."""
    config = preset_config(name, tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if on_cuda else []), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration._from_config(
            config, attn_implementation=attention_implementation(config, attn_implementation)
        )
    return model.to(dtype)


def load_model(config: ModelConfig, device: torch.device | str | None = None, quantize_llm: bool = False):
    """Load (model, tokenizer). The model is in eval mode; its dtype follows `config.dtype`.

    `quantize_llm`: the LLM in 4-bit NF4 for QLoRA (`ivl.model.quantize`), fused MoE experts included; the rest keeps
    `config.dtype`.
    """
    name = preset_name(config.name_or_path)
    _check_local_model(config.name_or_path)
    original = _original_checkpoint(config.name_or_path)
    tokenizer = load_tokenizer(config)
    dtype = resolve_dtype(config.dtype)
    if name is not None and not quantize_llm:
        model = build_preset_model(name, tokenizer, config.init_seed, dtype, config.attn_implementation, device)
    elif original is not None and not quantize_llm:
        from ivl.model.convert import load_original_model

        model = load_original_model(original, dtype, config.attn_implementation)
    elif name is not None or original is not None:
        # bitsandbytes quantises while loading weights, so a preset or an original checkpoint goes through a
        # (temporary) HF-native checkpoint.
        with tempfile.TemporaryDirectory(prefix="ivl-load-") as tmp:
            if original is not None:
                from ivl.model.convert import convert_checkpoint

                convert_checkpoint(original, tmp, to="hf")
            else:
                preset = build_preset_model(name, tokenizer, config.init_seed, dtype, config.attn_implementation,
                                            device)  # fmt: skip
                preset.save_pretrained(tmp)
            model = _from_pretrained(tmp, config, dtype, quantize_llm, device)
    else:
        model = _from_pretrained(config.name_or_path, config, dtype, quantize_llm, device)
    if device is not None and not quantize_llm:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _from_pretrained(source: str, config: ModelConfig, dtype: torch.dtype, quantize_llm: bool, device):
    extra, loading = {}, contextlib.nullcontext()
    if quantize_llm:
        from ivl.model.quantize import loading_4bit, nf4_config

        extra = {"quantization_config": nf4_config(dtype), "device_map": {"": device or "cpu"}}
        loading = loading_4bit()  # MoE experts quantised as they are read, never all dense
    try:
        model_config = InternVLConfig.from_pretrained(
            source, trust_remote_code=config.trust_remote_code, local_files_only=is_local_path(source)
        )
        with loading:
            model = InternVLForConditionalGeneration.from_pretrained(
                source,
                dtype=dtype,
                attn_implementation=attention_implementation(model_config, config.attn_implementation),
                trust_remote_code=config.trust_remote_code,
                use_safetensors=True,
                local_files_only=is_local_path(source),
                **extra,
            )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load an InternVL model from {config.name_or_path!r}: {error}") from error
    return model


def save_checkpoint(model, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write an HF-native checkpoint (safetensors, config, tokenizer) that `load_model` and transformers load."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tokens_per_tile(model_config) -> int:
    """LLM tokens per image tile, derived from an `InternVLConfig` (never hard-coded)."""
    vision = model_config.vision_config
    image_size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch_size = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return _tokens_per_tile_of(image_size, patch_size, model_config.downsample_ratio)


def tile_size(model_config) -> int:
    image_size = model_config.vision_config.image_size
    return image_size[0] if isinstance(image_size, (list, tuple)) else image_size


def load_model_config(config: ModelConfig):
    """The `InternVLConfig` alone (no weights): enough for tile sizes, token counts and planning."""
    name = preset_name(config.name_or_path)
    if name is not None:
        return preset_config(name, load_tokenizer(config))
    _check_local_model(config.name_or_path)
    original = _original_checkpoint(config.name_or_path)
    if original is not None:
        from ivl.model.convert import hf_model_config

        return hf_model_config(original)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            config.name_or_path,
            trust_remote_code=config.trust_remote_code,
            local_files_only=is_local_path(config.name_or_path),
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read a model config from {config.name_or_path!r}: {error}") from error


def model_config_of(model: ModelConfig) -> InternVLConfig:
    """The `InternVLConfig` of `model.name_or_path` without downloading: zoo hub ids (OpenGVLab/InternVL3-8B-hf,
    InternVL2_5-8B, InternVL3_5-8B-Instruct-HF, ...) are matched to `ivl.model.presets.ZOO`; presets and local
    checkpoints are read as training reads them; anything else asks the hub for its config.json only."""
    from ivl.model.presets import ZOO

    def key(name: str) -> str:
        return "".join(char for char in name.lower() if char.isalnum())

    zoo = {key(name): name for name in ZOO}
    hub_name = model.name_or_path.rsplit("/", 1)[-1].removesuffix("-hf").removesuffix("-HF")
    for stage in STAGE_SUFFIXES:  # a release's training stages share its shapes
        hub_name = hub_name.removesuffix(stage)
    hub_name = key(hub_name)
    if hub_name in zoo and not model.name_or_path.startswith("preset:"):
        return preset_config(zoo[hub_name])
    return load_model_config(model)
