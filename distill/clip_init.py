"""CLIP ViT (`CLIPVisionModel`, e.g. CLIP-ViT-L/14-336) -> InternViT-300M-shaped student weights
(docs/design/distillation.md).

What moves where (CLIP name -> InternVLVisionModel name; `{i}` a layer):
- `encoder.layers.{i}.self_attn.{q,k,v}_proj` -> `encoder.layer.{i}.attention.{q,k,v}_proj`: both sides keep q, k, v
  split (an original-format InternViT fuses them as q | k | v rows; `ivl.model.convert` does that when the student
  is written in that layout). `out_proj` -> `attention.projection_layer`, `mlp.fc1/fc2` -> `mlp.fc1/fc2`,
  `layer_norm1/2` -> `layernorm_before/after`; the layer scales `lambda_1/2` (CLIP has none) start at 1.
- `embeddings.position_embedding` (g x g + 1) -> `position_embeddings` (n x n + 1 for the student's image size):
  the CLS row is kept, the grid resized bicubically exactly as transformers' `interpolate_pos_encoding` does.
- `embeddings.patch_embedding` (no bias) -> `patch_embeddings.projection` (weight and bias), with CLIP's pixel
  normalisation folded in: the student reads ImageNet-normalised pixels p_in and must compute what CLIP computes on
  CLIP-normalised pixels p_clip = p_in * std_in / std_clip + (mean_in - mean_clip) / std_clip, per channel. The
  convolution is linear, so the per-channel scale goes into the weight and the offset into a bias (exact).
- `pre_layrnorm` (applied to every embedding before layer 0) has no InternViT counterpart. LayerNorm is
  y = gamma * (e - mean(e)) / sigma(e) + beta per token: the centring and the affine part are linear and fold exactly
  into the patch weight / bias, CLS token and position embeddings; only the per-token 1 / sigma(e) cannot. With
  `pre_layernorm: fold` it is replaced by one constant, the mean sigma over calibration tiles (an approximation
  whose effect the cosine to CLIP at initialisation reports); `drop` leaves the embeddings unnormalised.
- `post_layernorm` only touches CLIP's pooled output; InternViT with mean pooling has no final norm: not used.
Layers beyond the student's depth are not used; a wider / deeper student or another head count cannot be mapped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, InternVLVisionConfig

from ivl.config import ConfigError
from ivl.distill.models import image_size_of, patch_size_of, vision_name
from ivl.image import IMAGENET_MEAN, IMAGENET_STD, normalize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing (the default when none is shipped)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIP role -> (CLIP module name, InternVLVisionModel role of `parts.HF_NAMES`)
CLIP_LAYER_ROLES = {
    "self_attn.q_proj": "vision.q",
    "self_attn.k_proj": "vision.k",
    "self_attn.v_proj": "vision.v",
    "self_attn.out_proj": "vision.out",
    "mlp.fc1": "vision.fc1",
    "mlp.fc2": "vision.fc2",
    "layer_norm1": "vision.norm1",
    "layer_norm2": "vision.norm2",
}


def clip_pixel_stats(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) CLIP's own preprocessing uses: from the checkpoint's preprocessor_config.json when it has one."""
    path = Path(name_or_path) / "preprocessor_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        return tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def check_mappable(clip: CLIPVisionConfig, student: InternVLVisionConfig) -> None:
    problems = []
    for field in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if getattr(clip, field) != getattr(student, field):
            problems.append(f"{field} {getattr(clip, field)} (CLIP) != {getattr(student, field)} (student)")
    if student.num_hidden_layers > clip.num_hidden_layers:
        problems.append(f"the student has {student.num_hidden_layers} layers, CLIP only {clip.num_hidden_layers}")
    if student.norm_type != "layer_norm" or student.use_qk_norm or not student.attention_bias:
        problems.append("the student must use LayerNorm, no QK-norm and qkv bias (InternViT-300M style) like CLIP")
    if patch_size_of(clip) != patch_size_of(student):
        problems.append(f"patch size {patch_size_of(clip)} (CLIP) != {patch_size_of(student)} (student)")
    if problems:
        raise ConfigError("student.init=clip: this CLIP cannot initialise this student: " + "; ".join(problems))


def resize_positions(positions: Tensor, grid: int) -> Tensor:
    """[1 + g*g, d] position embeddings (CLS first) -> [1 + grid*grid, d]; bicubic, align_corners=False, as
    transformers' CLIP / InternViT `interpolate_pos_encoding`."""
    cls, patches = positions[:1], positions[1:]
    side = int(round(patches.shape[0] ** 0.5))
    if side == grid:
        return positions.clone()
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, d, g, g]
    image = F.interpolate(image.float(), size=(grid, grid), mode="bicubic", align_corners=False).to(patches.dtype)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def fold_normalisation(weight: Tensor, clip_mean, clip_std, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A bias-free patch convolution on CLIP-normalised pixels -> (weight, bias) of one on `mean`/`std`-normalised
    pixels computing the same. weight: [d, 3, p, p]; returns ([d, 3, p, p], [d])."""
    scale = torch.tensor([s / c for s, c in zip(std, clip_std, strict=True)], dtype=torch.float64)
    offset = torch.tensor([(m - c) / cs for m, c, cs in zip(mean, clip_mean, clip_std, strict=True)],
                          dtype=torch.float64)  # fmt: skip
    weight64 = weight.double()
    folded = weight64 * scale.view(1, 3, 1, 1)
    bias = (weight64 * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return folded.to(weight.dtype), bias.to(weight.dtype)


def fold_pre_layernorm(embed: dict[str, Tensor], gamma: Tensor, beta: Tensor, sigma: float) -> dict[str, Tensor]:
    """Fold LayerNorm(e) ~= gamma * (e - mean(e)) / sigma + beta into the embedding tensors (e is linear in them).

    embed: weight [d, 3, p, p], bias [d], cls [d], positions [1 + n, d]. The centring C(x) = x - mean_d(x) is applied to
    every term of e; beta is added once per token, so it goes into the patch bias and the CLS token (not the positions).
    """
    scale = (gamma / sigma).double()
    return {
        "weight": (scale.view(-1, 1, 1, 1) * (embed["weight"].double() - embed["weight"].double().mean(0))),
        "bias": scale * (embed["bias"].double() - embed["bias"].double().mean()) + beta.double(),
        "cls": scale * (embed["cls"].double() - embed["cls"].double().mean()) + beta.double(),
        "positions": scale * (embed["positions"].double() - embed["positions"].double().mean(-1, keepdim=True)),
    }


@torch.no_grad()
def pre_layernorm_sigma(clip: CLIPVisionModel, tiles: Tensor, clip_mean, clip_std) -> float:
    """Mean per-token standard deviation (with CLIP's eps) of CLIP's embeddings on uint8 `tiles` [n, 3, S, S]."""
    embeddings = clip.embeddings(normalize(tiles, clip_mean, clip_std), interpolate_pos_encoding=True).double()
    variance = embeddings.var(dim=-1, unbiased=False) + clip.pre_layrnorm.eps
    return variance.sqrt().mean().item()


def clip_to_internvit(
    clip: CLIPVisionModel,
    student: InternVLVisionConfig,
    clip_mean: tuple[float, ...],
    clip_std: tuple[float, ...],
    pre_layernorm_scale: float | None,
) -> dict[str, Tensor]:
    """Every tensor of an InternVLVisionModel(`student`) from `clip`'s weights (see the module docstring).

    `pre_layernorm_scale`: the constant sigma replacing the pre-LayerNorm's per-token one (fold), None to drop it.
    """
    check_mappable(clip.config, student)
    state = {name.removeprefix("vision_model."): tensor for name, tensor in clip.state_dict().items()}
    grid = image_size_of(student) // patch_size_of(student)
    weight, bias = fold_normalisation(state["embeddings.patch_embedding.weight"], clip_mean, clip_std)
    embed = {"weight": weight, "bias": bias, "cls": state["embeddings.class_embedding"],
             "positions": resize_positions(state["embeddings.position_embedding.weight"], grid)}  # fmt: skip
    if pre_layernorm_scale is not None:
        embed = fold_pre_layernorm(embed, state["pre_layrnorm.weight"], state["pre_layrnorm.bias"], pre_layernorm_scale)
    dtype = weight.dtype
    patch = vision_name("vision.patch")
    out = {
        f"{patch}.weight": embed["weight"].to(dtype),
        f"{patch}.bias": embed["bias"].to(dtype),
        vision_name("vision.cls"): embed["cls"].to(dtype).reshape(1, 1, -1),
        vision_name("vision.position"): embed["positions"].to(dtype).unsqueeze(0),
    }
    for i in range(student.num_hidden_layers):
        for clip_role, role in CLIP_LAYER_ROLES.items():
            for suffix in ("weight", "bias"):
                out[f"{vision_name(role, i)}.{suffix}"] = state[f"encoder.layers.{i}.{clip_role}.{suffix}"].clone()
        for role in ("vision.scale1", "vision.scale2"):  # CLIP's residual branches are unscaled
            out[vision_name(role, i)] = torch.ones(student.hidden_size, dtype=dtype)
    return out
