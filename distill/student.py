"""The student: an InternViT-300M-shaped (or smaller) HF-native `InternVLVisionModel`, from scratch or initialised
from a CLIP ViT (`ivl.distill.clip_init`), plus the learned adaptors (student width -> teacher width) that exist only
for training and are dropped at export.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import CLIPVisionModel, InternVLVisionModel

from ivl.distill.clip_init import clip_pixel_stats, clip_to_internvit, pre_layernorm_sigma
from ivl.distill.models import build_vision_model, clip_config, hidden_states, preset_of
from ivl.distill.options import StudentConfig
from ivl.image import normalize
from ivl.model.load import ModelLoadError


def load_clip(name_or_path: str, seed: int = 0) -> CLIPVisionModel:
    """A CLIP vision tower in fp32: a hub id or path (a CLIPModel checkpoint works), or preset:tiny-clip."""
    preset = preset_of(name_or_path)
    if preset is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CLIPVisionModel(clip_config(preset)).eval()
    try:
        return CLIPVisionModel.from_pretrained(name_or_path, dtype=torch.float32).eval()
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a CLIPVisionModel from {name_or_path!r}: {error}") from error


@torch.no_grad()
def cosine_to_clip(student: nn.Module, clip: CLIPVisionModel, tiles: Tensor, clip_mean, clip_std) -> float:
    """Mean per-token cosine between the student's last hidden states on ImageNet-normalised `tiles` (uint8) and
    CLIP's on CLIP-normalised ones (CLIP's positions interpolated to the same grid)."""
    ours = hidden_states(student, normalize(tiles), [student.config.num_hidden_layers - 1])
    ours = next(iter(ours.values())).float()
    theirs = clip(pixel_values=normalize(tiles, clip_mean, clip_std), interpolate_pos_encoding=True)
    return F.cosine_similarity(ours, theirs.last_hidden_state.float(), dim=-1).mean().item()


def build_student(config: StudentConfig, calibration: Tensor | None = None) -> tuple[InternVLVisionModel, dict]:
    """(fp32 student, init report). `calibration`: uint8 tiles [n, 3, S, S] for CLIP's pre-LayerNorm fold and the
    cosine to CLIP at initialisation (both only with init=clip)."""
    vision = config.vision_config()
    student = build_vision_model(vision, config.init_seed)
    if config.init == "scratch":
        return student, {"init": "scratch"}
    if calibration is None:
        raise ValueError("init=clip needs calibration tiles")
    clip = load_clip(config.clip, config.init_seed)
    clip_mean, clip_std = clip_pixel_stats(config.clip)
    sigma = pre_layernorm_sigma(clip, calibration, clip_mean, clip_std) if config.pre_layernorm == "fold" else None
    state = clip_to_internvit(clip, vision, clip_mean, clip_std, sigma)
    student.load_state_dict(state, strict=True)
    report = {
        "init": "clip",
        "clip": config.clip,
        "clip_layers_used": f"{vision.num_hidden_layers} of {clip.config.num_hidden_layers}",
        "pre_layernorm": config.pre_layernorm,
        "pre_layernorm_sigma": sigma,
        "cosine_to_clip": cosine_to_clip(student, clip, calibration, clip_mean, clip_std),
        "calibration_tiles": len(calibration),
    }
    return student, report


class StudentWithAdaptors(nn.Module):
    """The student plus one linear adaptor (student width -> teacher width) per supervised layer pair.

    One module so DDP wraps (and checkpoints save) both; `forward` gives the adapted hidden states of the student
    layers, in pair order: each [B, 1 + num_patches, teacher_width].
    """

    def __init__(self, student: InternVLVisionModel, student_layers: list[int], teacher_width: int, seed: int = 0):
        super().__init__()
        self.student = student
        self.student_layers = student_layers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adaptors = nn.ModuleList(nn.Linear(student.config.hidden_size, teacher_width) for _ in student_layers)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        states = hidden_states(self.student, pixel_values, self.student_layers)
        return [adaptor(states[layer]) for adaptor, layer in zip(self.adaptors, self.student_layers, strict=True)]
