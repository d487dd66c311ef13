"""Distillation losses: pure functions on hidden states (docs/design/distillation.md).

The student's hidden state of each supervised layer, mapped to the teacher's width by its adaptor, is compared token
by token with the teacher's: by negative cosine similarity (written 1 - cos, so a perfect match is 0) and optionally
smooth-L1. Patch tokens and the CLS token are weighted separately; the supervised layer pairs are averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor
from torch.nn import functional as F

from ivl.distill.options import LossConfig


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - cos(student, teacher) along the last dim: [..., D], [..., D] -> [...]."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


def smooth_l1_distance(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """Smooth-L1 averaged over the last dim: [..., D], [..., D] -> [...]."""
    return F.smooth_l1_loss(student, teacher, reduction="none", beta=beta).mean(dim=-1)


def token_distances(config: LossConfig) -> list[tuple[float, Callable[[Tensor, Tensor], Tensor]]]:
    """The weighted per-token distance terms in use."""
    terms = {
        "cosine": (config.cosine_weight, cosine_distance),
        "smooth_l1": (config.smooth_l1_weight, partial(smooth_l1_distance, beta=config.smooth_l1_beta)),
    }
    return [(weight, distance) for weight, distance in terms.values() if weight > 0]


def select_tokens(patches: Tensor, token_index: Tensor | None) -> Tensor:
    """The patch tokens a (subsampled) target holds: [B, T, D] with index [B, T'] -> [B, T', D]."""
    if token_index is None:
        return patches
    return patches.gather(1, token_index.long().unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


def layer_loss(student: Tensor, teacher_patch: Tensor, teacher_cls: Tensor, token_index: Tensor | None,
               config: LossConfig) -> Tensor:  # fmt: skip
    """Per-tile loss of one layer pair.

    student: adapted student states [B, 1 + T, D] (CLS first); teacher_patch [B, T', D] (T' = T, or the subsampled
    tokens `token_index` [B, T'] names); teacher_cls [B, D]. Returns [B].
    """
    student_patch = select_tokens(student[:, 1:], token_index).float()
    student_cls = student[:, 0].float()
    loss = student.new_zeros(student.shape[0], dtype=student_patch.dtype)
    for weight, distance in token_distances(config):
        patch = distance(student_patch, teacher_patch.float()).mean(dim=-1)
        cls = distance(student_cls, teacher_cls.float())
        loss = loss + weight * (config.patch_weight * patch + config.cls_weight * cls)
    return loss


def distill_loss(student_states: list[Tensor], targets: list[dict[str, Tensor]], token_index: Tensor | None,
                 config: LossConfig) -> Tensor:  # fmt: skip
    """Per-tile loss [B]: the mean over layer pairs of `layer_loss`; targets[i] = {"patch", "cls"} of pair i."""
    losses = [
        layer_loss(states, target["patch"], target["cls"], token_index, config)
        for states, target in zip(student_states, targets, strict=True)
    ]
    return sum(losses) / len(losses)


def token_cosines(student: Tensor, teacher_patch: Tensor, teacher_cls: Tensor, token_index: Tensor | None):
    """(patch cosine summed over tokens [B], CLS cosine [B]) for evaluation: the same token selection as the loss."""
    student_patch = select_tokens(student[:, 1:], token_index).float()
    patch = F.cosine_similarity(student_patch, teacher_patch.float(), dim=-1).sum(dim=-1)
    return patch, F.cosine_similarity(student[:, 0].float(), teacher_cls.float(), dim=-1)
