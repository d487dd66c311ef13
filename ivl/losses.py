"""Training losses as pure functions (shapes in the docstrings).

The SFT loss is a *sum* of token cross-entropies divided by a denominator the caller passes in: under gradient
accumulation and data parallelism the denominator must be the global supervised-token count of the whole optimizer
step (all micro-batches, all ranks), so the gradient does not depend on how the step is split
(docs/design/loss_reweighting.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ivl.data.chat import IGNORE_INDEX
from ivl.options import Reduction

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


# Loss reweighting (docs/design/loss_reweighting.md): a (sub-)sample with x supervised targets weighs each of them
# 1/x^p. token (p = 0) lets long samples dominate, sample (p = 1) short ones; square (p = 0.5) is InternVL 2.5's default
# between the two.
REDUCTION_EXPONENTS: dict[str, float] = {"token": 0.0, "sample": 1.0, "square": 0.5}


def target_weights(labels: torch.Tensor, sample_tokens: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """The loss weight [B, T] fp32 of the next-token target at each position (0 where it is unsupervised).

    labels [B, T] unshifted (IGNORE_INDEX on unsupervised positions); sample_tokens [B, T] the supervised-target count
    x of the (sub-)sample each token belongs to (packed rows hold several). A target at position t + 1 weighs
    1 / x^p of its own sub-sample, p = REDUCTION_EXPONENTS[reduction]."""
    targets, counts = shift_labels(labels), F.pad(sample_tokens[:, 1:], (0, 1), value=1)
    weights = counts.clamp(min=1).float().pow(-REDUCTION_EXPONENTS[reduction])
    return torch.where(targets != IGNORE_INDEX, weights, torch.zeros_like(weights))


def weighted_nll(logps: torch.Tensor, weights: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """sum(weights * -logps) / denominator: logps, weights [N] of the supervised targets. With the denominator = the
    sum of the weights over the whole optimizer step (all micro-batches and processes) this is the
    reweighted loss sum(w * CE) / sum(w) of docs/design/loss_reweighting.md, whatever the split of the step."""
    return -(weights * logps).sum() / denominator


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
    most of the sequence, so this alone removes most of the logits. Pass the collated labels as they come, on the
    CPU: the index is then found there and copied to the device without blocking. Found on a GPU, `nonzero` would
    make the host wait for the whole forward pass queued before it (N decides the shapes of what follows)."""
    targets = shift_labels(labels)
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    targets = targets[rows, cols]
    rows, cols, targets = (to_device(index, hidden.device) for index in (rows, cols, targets))
    return SupervisedTokens(hidden[rows, cols], targets, rows, cols)


def supervised_weights(labels: torch.Tensor, sample_tokens: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """The loss weights [N] of the supervised targets in `supervised_tokens`' order (row-major), from the same labels
    [B, T] and sample_tokens [B, T] (`target_weights`); built where they are, the CPU for a collated batch."""
    return target_weights(labels, sample_tokens, reduction)[shift_labels(labels) != IGNORE_INDEX]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor goes to a GPU from page-locked memory, without blocking the host (the copy
    is ordered before the kernels that read it on the same stream)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _chunk_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # [n, V]
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=1)


def token_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) [N] in fp32 from hidden states [N, H] through the vocabulary projection `lm_head`.

    Written by hand because no library piece does it on CPU and GPU alike without materialising [N, V] logits (Liger's
    fused linear cross-entropy is CUDA/Triton only and returns a reduced loss, not per-token log-probs, which MPO
    needs). The projection runs in chunks of LOGITS_CHUNK_ELEMENTS // V rows, each under activation checkpointing, so
    one chunk of logits exists at a time in the forward pass and again in the backward pass (recomputed there: one
    extra lm_head matmul per chunk, against storing all [N, V] logits). When every position fits one chunk (small
    batches, small vocabularies) nothing is recomputed."""
    vocab_size = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // vocab_size)
    if targets.shape[0] <= chunk:  # all the logits fit one chunk's budget: keep them for backward, no recomputation
        return _chunk_logps(lm_head, hidden, targets)
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


# --- MPO: Mixed Preference Optimization (docs/design/mpo.md) ----------------------------------------------------------
# Inputs are per-sequence sums of token log-probs, shape [B], for the chosen and rejected answer of each pair, under
# the policy and the reference. Rewards are r = beta * (log pi - log pi_ref); every loss below is per pair, [B].


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """[B], [B] -> r [B] = beta * (log pi(y|x) - log pi_ref(y|x))."""
    return beta * (policy_logps - ref_logps)


def dpo_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """L_pref [B] = -log sigmoid(r_c - r_r) (DPO's sigmoid loss)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def bco_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, reward_shift: float) -> torch.Tensor:
    """L_qual [B] = -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta)) (BCO with the reward shift delta; TRL's
    `bco_pair` is this with delta = 0)."""
    return -F.logsigmoid(chosen_rewards - reward_shift) - F.logsigmoid(-(rejected_rewards - reward_shift))


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    sft_loss: torch.Tensor,
    *,
    beta: float = 0.1,
    weights: tuple[float, float, float] = (0.8, 0.2, 1.0),
    reward_shift: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = w_p * mean(L_pref) + w_q * mean(L_qual) + w_g * sft_loss; the log-prob tensors are [B] sequence sums,
    `sft_loss` the already-reduced generation loss on the chosen answers (a scalar).

    Returns (loss, metrics): detached per-batch means of the chosen / rejected rewards, their margin, the reward
    accuracy (r_c > r_r), and `reward_sum` / `reward_count` over all 2B rewards, from which the caller updates the
    reward shift once per optimizer step (over every micro-batch and process)."""
    chosen = implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta)
    rejected = implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta)
    preference_weight, quality_weight, generation_weight = weights
    loss = (
        preference_weight * dpo_loss(chosen, rejected).mean()
        + quality_weight * bco_loss(chosen, rejected, reward_shift).mean()
        + generation_weight * sft_loss
    )
    chosen, rejected = chosen.detach(), rejected.detach()
    metrics = {
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "rewards_margin": (chosen - rejected).mean(),
        "rewards_accuracy": (chosen > rejected).float().mean(),
        "reward_sum": chosen.sum() + rejected.sum(),
        "reward_count": torch.tensor(2.0 * chosen.numel(), device=chosen.device),
    }
    return loss, metrics
