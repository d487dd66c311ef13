"""Training losses as pure functions (shapes in the docstrings).

The SFT loss is a *sum* of token cross-entropies divided by a denominator the caller passes in: under gradient
accumulation and data parallelism the denominator must be the global supervised-token count of the whole optimizer
step (all micro-batches, all ranks), so the gradient does not depend on how the step is split (SPEC 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data.chat import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> the next-token targets [B, T] aligned with the logits at each position (last is ignored)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def num_supervised_tokens(labels: torch.Tensor) -> int:
    """Supervised next-token targets in a batch of (unshifted) labels [B, T]."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """sum over supervised positions of CE(logits, next token) / denominator.

    logits [B, T, V] (any float dtype; the cross-entropy runs in fp32), labels [B, T] unshifted with IGNORE_INDEX on
    unsupervised positions. Returns a scalar. With denominator = the batch's own supervised-token count this is the
    usual token-averaged loss.
    """
    targets = shift_labels(labels)
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / denominator
