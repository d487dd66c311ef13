"""Training losses as pure functions (shapes in the docstrings).

The SFT loss is a *sum* of token cross-entropies divided by a denominator the caller passes in: under gradient
accumulation and data parallelism the denominator must be the global supervised-token count of the whole optimizer
step (all micro-batches, all ranks), so the gradient does not depend on how the step is split (SPEC 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune.data.chat import IGNORE_INDEX

# fp32 logits elements projected at once by `token_logps` (128 MiB): 221 positions of a 151,674-entry vocabulary. A
# chunk's logits, their fp32 copy and the softmax's temporary exist together, so the loss adds ~3x this at its peak.
LOGITS_CHUNK_ELEMENTS = 2**25


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


@dataclass
class SupervisedTokens:
    """The N positions of a batch whose next token is supervised, row-major: the hidden state at (rows[i], cols[i])
    predicts targets[i] = labels[rows[i], cols[i] + 1]."""

    hidden: torch.Tensor  # [N, H]
    targets: torch.Tensor  # [N]
    rows: torch.Tensor  # [N]
    cols: torch.Tensor  # [N]


def supervised_tokens(hidden: torch.Tensor, labels: torch.Tensor) -> SupervisedTokens:
    """hidden [B, T, H], labels [B, T] unshifted (IGNORE_INDEX on unsupervised positions) -> the supervised positions.

    Only these positions need a vocabulary projection: in SFT data the prompt and the image tokens (256 per tile) are
    most of the sequence, so this alone removes most of the logits."""
    targets = shift_labels(labels)
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return SupervisedTokens(hidden[rows, cols], targets[rows, cols], rows, cols)


def _chunk_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # [n, V]
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=1)


def token_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) [N] in fp32 from hidden states [N, H] through the vocabulary projection `lm_head`.

    Written by hand because no library piece does it on CPU and GPU alike without materialising [N, V] logits (Liger's
    fused linear cross-entropy is CUDA/Triton only and returns a reduced loss, not per-token log-probs, which MPO
    needs). The projection runs in chunks of LOGITS_CHUNK_ELEMENTS // V rows, each under activation checkpointing, so
    one chunk of logits exists at a time in the forward pass and again in the backward pass (recomputed there: one
    extra lm_head matmul per chunk, against storing all [N, V] logits)."""
    vocab_size = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // vocab_size)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    pieces = []
    for start in range(0, targets.shape[0], chunk):
        piece_hidden, piece_targets = hidden[start : start + chunk], targets[start : start + chunk]
        if needs_grad:
            pieces.append(checkpoint(_chunk_logps, lm_head, piece_hidden, piece_targets, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, piece_hidden, piece_targets))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
