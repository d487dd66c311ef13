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


# --- MPO: Mixed Preference Optimization (SPEC 9) ----------------------------------------------------------------------
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
