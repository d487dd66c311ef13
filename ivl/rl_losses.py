"""Online RL losses with verifiable rewards, as pure functions (shapes in the docstrings): group-normalised advantages
and the clipped policy-gradient objective at token level (GRPO) or sequence level (GSPO).

For one prompt, G answers y_1..y_G are sampled from the policy as it was when they were generated (pi_old) and
scored r_1..r_G. Each answer's advantage is its reward measured against its own group:
A_i = (r_i - mean(r)) / (std(r) + eps). A group whose answers all score the same has A = 0 everywhere: it pushes
nothing, so it is counted (the share of such groups says whether the task is too easy or too hard for G answers).

The importance ratio compares the policy being trained (pi) with pi_old on the sampled tokens:
- token level (GRPO): one ratio per token, w_it = pi(y_it) / pi_old(y_it);
- sequence level (GSPO): one ratio per answer, the geometric mean of its token ratios,
  s_i = exp(mean_t log(pi(y_it) / pi_old(y_it))). A geometric mean of many tokens moves little, hence GSPO's tiny
  clipping ranges (3e-4 below, 4e-4 above 1 in InternVL3.5).
Per token the objective is min(w A, clip(w, 1 - eps_low, 1 + eps_high) A) - beta * KL, where KL is the k3
estimator q - log q - 1 with q = pi_ref / pi at that token (always >= 0, unbiased for KL(pi || pi_ref) under pi).
The loss of an answer is minus that, averaged over its tokens; the loss of a batch is the mean over its answers.

These equal TRL 1.16's `GRPOTrainer._compute_loss` with `loss_type="grpo"` (per-answer token mean, then mean over
answers), `importance_sampling_level` "token" or "sequence", `epsilon` / `epsilon_high` as eps_low / eps_high,
`beta`, `delta=None`, `use_bias_correction_kl=False`; and TRL's `scale_rewards="group"` advantages (Bessel-corrected
group std). tests/test_rl_losses.py checks both on the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # [N, G] A_i of each answer, grouped by prompt
    zero_variance_groups: int  # groups whose G rewards are all equal (A = 0: no signal)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> Advantages:
    """rewards [N, G] (N prompts, G answers each) -> A [N, G] = (r - mean_g r) / (std_g r + eps).

    std is the sample standard deviation (Bessel-corrected, as TRL's); a group of equal rewards gets A = 0 exactly
    and is counted in `zero_variance_groups`. G must be >= 2."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        shape = tuple(rewards.shape)
        raise ValueError(f"rewards must be [prompts, answers] with at least 2 answers per prompt, got {shape}")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    zero = torch.isclose(std, torch.zeros_like(std)).squeeze(1)
    values = torch.where(zero.unsqueeze(1), torch.zeros_like(rewards), (rewards - mean) / (std + eps))
    return Advantages(values, int(zero.sum()))


def token_log_ratios(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO: log w [B, T] = log pi - log pi_old per answer token (padding positions are masked out later)."""
    return logps - old_logps


def sequence_log_ratios(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO: log s [B, 1] = mean over the answer's tokens of (log pi - log pi_old) (a length-normalised ratio)."""
    lengths = mask.sum(dim=-1).clamp(min=1)
    return (((logps - old_logps) * mask).sum(dim=-1) / lengths).unsqueeze(-1)


# loss.level -> the log importance weights it uses.
LOG_RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": token_log_ratios,
    "sequence": sequence_log_ratios,
}


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """[B, T], [B, T] -> KL estimate [B, T] = q - log q - 1 with q = pi_ref / pi (k3; >= 0, zero where pi = pi_ref)."""
    log_q = ref_logps - logps
    return torch.exp(log_q) - log_q - 1


@dataclass
class PolicyLoss:
    per_answer: torch.Tensor  # [B] each answer's loss: -(clipped objective - beta * KL), averaged over its tokens
    clipped: torch.Tensor  # [B] share of the answer's tokens (or the answer, at sequence level) clipped, detached
    kl: torch.Tensor | None  # [B] mean k3 KL per answer, detached; None with beta = 0


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> PolicyLoss:
    """The clipped policy-gradient loss of B answers.

    logps [B, T]: log pi of each answer token under the policy being trained (carries the gradient); old_logps
    [B, T]: the same under pi_old (no gradient; with one update per generation batch pass logps.detach(): ratios are
    1 and the gradient is A * grad log pi); advantages [B]; mask [B, T] 1 on answer tokens, 0 on padding; ref_logps
    [B, T] needed when beta > 0. level "token" (GRPO) or "sequence" (GSPO).

    The batch loss is per_answer.mean(); under accumulation / several processes divide per_answer.sum() by the
    global answer count instead."""
    mask = mask.to(logps.dtype)
    log_weights = LOG_RATIOS[level](logps, old_logps.detach(), mask)  # [B, T] or [B, 1]
    ratio = torch.exp(log_weights)
    adv = advantages.to(logps.dtype).unsqueeze(-1)  # [B, 1]
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [B, T] or [B, 1], broadcast over tokens below
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps.detach())
        per_token = per_token + beta * kl
    lengths = mask.sum(dim=-1).clamp(min=1)
    per_answer = (per_token * mask).sum(dim=-1) / lengths
    was_clipped = (((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))).to(logps.dtype)
    clipped = (was_clipped.expand_as(mask) * mask).sum(dim=-1).detach() / lengths
    kl_mean = None if kl is None else ((kl * mask).sum(dim=-1) / lengths).detach()
    return PolicyLoss(per_answer, clipped, kl_mean)
