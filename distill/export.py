"""What a distillation run leaves, and where the student goes next.

    OUTPUT/student/               the student as an HF-native InternVLVisionModel checkpoint (adaptors dropped),
                                  with `ivl_training.json` (teacher, layer pairs, initialisation report)
    OUTPUT/adaptors.safetensors   the adaptors, kept only so `ivl distill eval` can measure the cosine to the teacher
    OUTPUT/metrics.jsonl, OUTPUT/loss.png

`place_into_internvl` puts a student into an InternVL model as its vision tower (`ivl distill export --into`): the
LLM is kept, the projector too when the widths agree, else it is re-initialised (its input is 4 x the ViT width
after pixel shuffle); the result is an HF-native checkpoint ready for a stage-1 alignment run
(`ivl sft CONFIG model.name_or_path=OUT stage=stage1`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import InternVLVisionModel

from ivl.config import ConfigError
from ivl.distill.models import image_size_of, patch_size_of
from ivl.distill.student import StudentWithAdaptors
from ivl.model.checkpoint import TRAINING_INFO, read_training_info
from ivl.model.load import ModelConfig, load_model, save_checkpoint, tile_size
from ivl.model.parts import model_parts, part_modules, unwrap
from ivl.model.processor import save_processor
from ivl.outputs import temporary_path, write_error
from ivl.runtime import plot_curves

STUDENT_DIR = "student"
ADAPTORS_FILE = "adaptors.safetensors"


def save_run(out_dir: Path, model: StudentWithAdaptors, info: dict[str, Any], title: str) -> Path:
    """Write the student (atomically: temp dir + rename), its adaptors and the loss plot."""
    student_dir, tmp = out_dir / STUDENT_DIR, temporary_path(out_dir / STUDENT_DIR)
    adaptors_tmp = temporary_path(out_dir / ADAPTORS_FILE)
    adaptors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.adaptors.state_dict().items()}
    try:
        model.student.save_pretrained(tmp, safe_serialization=True)
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(student_dir, ignore_errors=True)
        os.replace(tmp, student_dir)
        save_file(adaptors, adaptors_tmp)
        os.replace(adaptors_tmp, out_dir / ADAPTORS_FILE)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        adaptors_tmp.unlink(missing_ok=True)
        raise write_error(out_dir, error, "the run's checkpoints, if any, are intact: rerun to resume") from error
    plot_curves(out_dir / "metrics.jsonl", out_dir / "loss.png", title)
    return student_dir


def load_run(run_dir: str | Path) -> tuple[StudentWithAdaptors, dict[str, Any]]:
    """A finished run's student with its adaptors (fp32), and its training info."""
    run_dir = Path(run_dir)
    student_dir = run_dir / STUDENT_DIR
    if not (student_dir / "config.json").is_file() or not (run_dir / ADAPTORS_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a finished distillation run (no {STUDENT_DIR}/ or {ADAPTORS_FILE})")
    student = InternVLVisionModel.from_pretrained(student_dir, dtype=torch.float32)
    info = read_training_info(student_dir)
    adaptors = load_file(run_dir / ADAPTORS_FILE)
    pairs = info["layer_pairs"]
    model = StudentWithAdaptors(student, [s for s, _ in pairs], adaptors["0.weight"].shape[0])
    model.adaptors.load_state_dict(adaptors)
    return model.eval(), info


def _replace_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def place_into_internvl(student_dir: str | Path, base: ModelConfig, out_dir: str | Path, seed: int = 0) -> list[str]:
    """Write `base` with the student as its vision tower to `out_dir`; returns notes for the user."""
    model, tokenizer = load_model(base)
    student = InternVLVisionModel.from_pretrained(student_dir, dtype=model.dtype)
    config = unwrap(model).config
    old_vision = config.vision_config
    if image_size_of(student.config) != tile_size(config) or patch_size_of(student.config) != patch_size_of(old_vision):
        raise ConfigError(
            f"the student reads {image_size_of(student.config)} px tiles in {patch_size_of(student.config)} px "
            f"patches, {base.name_or_path} {tile_size(config)} px in {patch_size_of(old_vision)} px: the LLM's image "
            "token count per tile would change"
        )
    config.vision_config = student.config
    _replace_module(model, part_modules("vision")[0], student)
    notes = [f"vision tower: {old_vision.hidden_size} wide x {old_vision.num_hidden_layers} layers -> "
             f"{student.config.hidden_size} x {student.config.num_hidden_layers}"]  # fmt: skip
    if student.config.hidden_size != old_vision.hidden_size:
        old_projector = model_parts(model).projector
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projector = type(old_projector)(config).to(model.dtype)
        _replace_module(model, part_modules("projector")[0], projector)
        notes.append("projector re-initialised (its input width changed): train it first (stage=stage1)")
    else:
        notes.append("projector kept; it was trained on the old ViT's features, so start with stage=stage1 anyway")
    save_checkpoint(model, tokenizer, out_dir)
    save_processor(out_dir, base, config)  # the tiles and tokens per tile are the base's (checked above)
    return notes
