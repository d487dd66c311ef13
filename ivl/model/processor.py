"""The processor files that let other tools load what the kit writes: transformers' `AutoProcessor` (InternVLProcessor:
GotOcr2's image processor + the tokenizer + the chat template) reads `preprocessor_config.json` and
`processor_config.json` next to the tokenizer. Every adapter / model / merged / exported directory gets them:

    save_processor(out_dir, base, model_config)    # the base's own files, else the ones its geometry implies

A base that has them (a local HF-native checkpoint, a hub id) passes them on unchanged. A preset, an original-format
checkpoint (its files describe remote code's preprocessing) or a hub id that cannot be reached gets the files written
from the model's geometry: the tile size, the LLM tokens per tile, and the tiling (crop to patches, tile counts).
transformers' processor needs torchvision; without it the image processor alone loads (`AutoImageProcessor` picks its
PIL backend).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers.utils.hub import cached_file

from ivl.model.load import preset_name, tile_size, tokens_per_tile
from ivl.options import DataConfig, ModelConfig

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
# What the base may have for its processor (the tokenizer's own files are saved with the tokenizer).
BASE_FILES = (IMAGE_PROCESSOR_FILE, PROCESSOR_FILE, "video_preprocessor_config.json", "chat_template.jinja",
              "chat_template.json")  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def hf_image_processor_config(tile_size: int, crop_to_patches: bool, min_patches: int, max_patches: int) -> dict:
    """`preprocessor_config.json` of transformers' InternVL image processor: GotOcr2's crop-to-patches is InternVL's
    dynamic tiling (the grid's crops, then a thumbnail), bicubic resize, ImageNet normalisation. The type is the
    processor family's name, so `AutoImageProcessor` picks the torchvision backend where it is installed, else PIL."""
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "size": {"height": tile_size, "width": tile_size},
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_convert_rgb": True,
        "crop_to_patches": crop_to_patches, "min_patches": min_patches, "max_patches": max_patches,
    }  # fmt: skip


def processor_config(model_config) -> dict[str, Any]:
    """`processor_config.json`: InternVLProcessor expands each image to <img> + image_seq_length x <IMG_CONTEXT> per
    tile + </img>, so image_seq_length must be the model's tokens per tile."""
    return {"image_seq_length": tokens_per_tile(model_config), "processor_class": "InternVLProcessor"}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _base_files(base: ModelConfig) -> dict[str, Path]:
    """The base's processor files (local directory or hub cache; none for presets, originals, unreachable hubs)."""
    if preset_name(base.name_or_path) is not None:
        return {}
    from ivl.model.convert import is_original_checkpoint

    if Path(base.name_or_path).is_dir() and is_original_checkpoint(Path(base.name_or_path)):
        return {}
    found = {}
    for name in BASE_FILES:
        path = cached_file(base.name_or_path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)  # fmt: skip
        if path is not None:
            found[name] = Path(path)
    return found


def _implied_tiling(base: ModelConfig, tiling: dict[str, Any] | None) -> dict[str, Any]:
    """crop_to_patches / min_patches / max_patches: an original checkpoint's own, else the run's data settings
    (`data.min_tiles`, `data.max_tiles`), else the kit's defaults."""
    from ivl.model.convert import is_original_checkpoint, read_checkpoint_config
    from ivl.model.convert_config import tiling_of_original

    path = Path(base.name_or_path)
    if preset_name(base.name_or_path) is None and path.is_dir() and is_original_checkpoint(path):
        return tiling_of_original(read_checkpoint_config(path))
    data = {**vars(DataConfig()), **(tiling or {})}
    return {"crop_to_patches": True, "min_patches": data["min_tiles"], "max_patches": data["max_tiles"]}


def save_processor(out_dir: str | Path, base: ModelConfig, model_config, data: dict[str, Any] | None = None) -> None:
    """Put the processor files into `out_dir`: the base's own when it has an image processor config, else the ones
    `model_config`'s geometry implies (tiling from `data`, a run's data settings, when given)."""
    out_dir = Path(out_dir)
    found = _base_files(base)
    for name, path in found.items():
        shutil.copyfile(path, out_dir / name)
    if IMAGE_PROCESSOR_FILE not in found:
        tiling = _implied_tiling(base, data)
        _write_json(out_dir / IMAGE_PROCESSOR_FILE, hf_image_processor_config(tile_size(model_config), **tiling))
    if PROCESSOR_FILE not in found:
        _write_json(out_dir / PROCESSOR_FILE, processor_config(model_config))
