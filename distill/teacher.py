"""The teacher: any InternViT, frozen, in bf16 (or int8 through bitsandbytes, `ivl.distill.int8`).

    teacher = load_teacher(TeacherConfig(name_or_path="OpenGVLab/InternViT-6B-448px-V2_5", dtype="bfloat16"), "cuda")

Accepted checkpoints (a local directory or a hub id; only the files holding the ViT are downloaded):
- a standalone HF-native `InternVLVisionModel` (config `model_type: internvl_vision`);
- an HF-native InternVL (`InternVLForConditionalGeneration`, the `-hf` checkpoints): its vision tower;
- an original InternVL (`InternVLChatModel`): its `vision_model.*`, renamed / split with `ivl.model.convert`'s rules;
- an original standalone InternViT (`InternVisionModel`, e.g. InternViT-6B-448px-V2_5), the same rules;
- `preset:NAME` (`ivl.distill.models.VIT_PRESETS`): random weights, for tests and the demo.
Only the ViT's tensors are read; the LLM of a full checkpoint is never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from transformers import InternVLConfig, InternVLVisionConfig, InternVLVisionModel

from ivl.distill.models import VISION_PREFIX, build_vision_model, hidden_states, preset_of, vision_config
from ivl.distill.options import TeacherConfig
from ivl.model.convert import checkpoint_format, conversion_rules, plan_conversion
from ivl.model.convert_config import VISION_FIELDS, read_checkpoint_config
from ivl.model.load import ModelLoadError, resolve_dtype
from ivl.model.parts import SAVED_PREFIXES, loaded_name
from ivl.model.tensor_io import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TensorGroup

ORIGINAL_VISION_PREFIX = "vision_model."
# Where a ViT's tensors live in each checkpoint file layout; an index without any of these is a standalone ViT.
VISION_KEY_PREFIXES = (SAVED_PREFIXES[VISION_PREFIX], VISION_PREFIX, ORIGINAL_VISION_PREFIX)


def load_teacher(config: TeacherConfig, device: torch.device | str) -> nn.Module:
    """The frozen teacher on `device`, in eval mode."""
    dtype = resolve_dtype(config.dtype)
    name = preset_of(config.name_or_path)
    if name is not None:
        model = build_vision_model(vision_config(name), config.init_seed, dtype)
    else:
        model = load_vision_checkpoint(local_checkpoint(config.name_or_path), dtype)
    model.requires_grad_(False)
    if config.quantize == "int8":
        from ivl.distill.int8 import quantize_int8

        return quantize_int8(model, device).eval()
    return model.to(device).eval()


def _is_standalone_original(config: dict) -> bool:
    return "InternVisionModel" in config.get("architectures", []) or config.get("model_type") == "intern_vit_6b"


def _vision_config_from_original(vision: dict, image_size: int | None = None) -> InternVLVisionConfig:
    fields = {hf: vision[name] for name, hf in VISION_FIELDS.items() if name in vision}
    fields.update(image_size=image_size or vision["image_size"], use_mean_pooling=True)
    return InternVLVisionConfig(use_absolute_position_embeddings=True, **fields)


def _same(tensor: Tensor) -> tuple[Tensor]:
    return (tensor,)


def vision_plan(path: Path, keys: list[str]) -> tuple[InternVLVisionConfig, list[TensorGroup]]:
    """The ViT's config and the groups turning the checkpoint's ViT tensors into standalone InternVLVisionModel
    names, for any of the accepted layouts."""
    raw = read_checkpoint_config(path)
    if _is_standalone_original(raw) or checkpoint_format(path) == "original":
        standalone = _is_standalone_original(raw)
        config = _vision_config_from_original(raw if standalone else raw["vision_config"],
                                              None if standalone else raw.get("force_image_size"))  # fmt: skip
        # Standalone originals have the same names without the `vision_model.` prefix.
        prefixed = {(ORIGINAL_VISION_PREFIX + key if standalone else key): key for key in keys}
        # Only the encoder proper: heads some standalone checkpoints carry (e.g. a CLIP projector) are not the ViT.
        encoder = tuple(ORIGINAL_VISION_PREFIX + part for part in ("embeddings.", "encoder."))
        vision_keys = [key for key in prefixed if key.startswith(encoder)]
        # The ViT rules are the same for every LLM family; qwen2's need no attention shape.
        groups = plan_conversion(vision_keys, conversion_rules("qwen2", 1, 1), "hf", "qwen2")
        return config, [
            TensorGroup(
                tuple(prefixed[s] for s in g.sources), tuple(t[len(VISION_PREFIX) :] for t in g.targets), g.transform
            )  # fmt: skip
            for g in groups
        ]
    if raw.get("model_type") == "internvl_vision":
        config = InternVLVisionConfig.from_pretrained(path)
        return config, [TensorGroup((key,), (key.removeprefix("internvl_vision."),), _same) for key in keys]
    if raw.get("model_type") == "internvl":
        config = InternVLConfig.from_pretrained(path).vision_config
        named = {loaded_name(key): key for key in keys}
        groups = [TensorGroup((key,), (name[len(VISION_PREFIX) :],), _same)
                  for name, key in named.items() if name.startswith(VISION_PREFIX)]  # fmt: skip
        return config, groups
    raise ModelLoadError(
        f"{path}: config.json model_type {raw.get('model_type')!r} is not an InternViT or InternVL checkpoint "
        "(expected internvl_vision, internvl, internvl_chat or intern_vit_6b)"
    )


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of checkpoint `path`, for the files that are present (a partial download
    holds only the ViT's shards)."""
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items() if (path / file).is_file()}
    if (path / SAFETENSORS_SINGLE).is_file():
        with safe_open(str(path / SAFETENSORS_SINGLE), "pt") as handle:
            return dict.fromkeys(handle.keys(), path / SAFETENSORS_SINGLE)
    raise ModelLoadError(f"{path}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (only safetensors are read)")


def load_vision_checkpoint(path: Path, dtype: torch.dtype) -> InternVLVisionModel:
    """The ViT of checkpoint directory `path` as a standalone InternVLVisionModel in `dtype`."""
    files = weight_files(path)
    config, groups = vision_plan(path, list(files))

    def fetch(name: str) -> Tensor:
        with safe_open(str(files[name]), "pt") as handle:
            return handle.get_tensor(name)

    state = {}
    for group in groups:
        missing = [name for name in group.sources if name not in files]
        if missing:
            raise ModelLoadError(f"{path}: {missing[0]} is named in the index but its file is missing")
        state.update({name: tensor.to(dtype).clone() for name, tensor in group.run(None, fetch).items()})
    with init_empty_weights(include_buffers=False):
        model = InternVLVisionModel._from_config(config, attn_implementation="sdpa")
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ModelLoadError(f"{path}: the ViT tensors do not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")  # fmt: skip
    model.load_state_dict(state, strict=True, assign=True)
    return model


def local_checkpoint(name_or_path: str) -> Path:
    """A local directory, or a hub id downloaded with only the shards that hold ViT tensors."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        local = Path(snapshot_download(name_or_path, allow_patterns=["*.json"]))
        patterns = ["*.json", SAFETENSORS_SINGLE]
        if (local / SAFETENSORS_INDEX).is_file():
            weight_map = json.loads((local / SAFETENSORS_INDEX).read_text())["weight_map"]
            vision = {f for name, f in weight_map.items() if name.startswith(VISION_KEY_PREFIXES)}
            patterns += sorted(vision or set(weight_map.values()))  # none prefixed: a standalone ViT, every shard
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except (OSError, ValueError, HfHubHTTPError) as error:
        raise ModelLoadError(f"cannot load a teacher from {name_or_path!r}: {error}") from error


class TeacherTargets:
    """Teacher targets computed on the fly (online mode): for each supervised teacher layer, its patch tokens
    [B, T, D] and CLS [B, D] on the normalised tiles the student sees; no token subsampling."""

    def __init__(self, teacher: nn.Module, layers: list[int]):
        self.teacher = teacher
        self.layers = layers

    @torch.no_grad()
    def __call__(self, batch: dict, pixel_values: Tensor) -> tuple[list[dict[str, Tensor]], None]:
        states = hidden_states(self.teacher, pixel_values, self.layers)
        return [{"patch": states[layer][:, 1:], "cls": states[layer][:, 0]} for layer in self.layers], None
