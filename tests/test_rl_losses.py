"""The GRPO / GSPO losses and group advantages: equal to their formulas restated on hand-built inputs, and equal to
TRL's GRPOTrainer loss (`_compute_loss`) on the same tensors and settings."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ivl.rl_losses import clipped_policy_loss, group_advantages


def test_group_advantages_restated_and_zero_variance_counted():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 2.0, 3.0]])
    result = group_advantages(rewards, eps=1e-4)
    for n, group in enumerate(rewards.tolist()):
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        expected = [0.0] * 4 if std == 0 else [(r - mean) / (std + 1e-4) for r in group]
        assert result.values[n].tolist() == pytest.approx(expected, abs=1e-6)
    assert result.zero_variance_groups == 1


def test_group_advantages_reject_single_answer_groups():
    with pytest.raises(ValueError, match="at least 2 answers"):
        group_advantages(torch.ones(3, 1))


def _inputs(seed: int = 0, batch: int = 4, length: int = 5):
    generator = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(batch, length, generator=generator) * 2).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(batch, length, generator=generator)
    ref = logps.detach() + 0.5 * torch.randn(batch, length, generator=generator)
    mask = torch.ones(batch, length)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])
    return logps, old, ref, mask, advantages


def _restated(logps, old, ref, mask, advantages, level, eps_low, eps_high, beta):
    """J restated answer by answer, token by token, in plain Python floats."""
    total = 0.0
    for i in range(logps.shape[0]):
        tokens = [t for t in range(logps.shape[1]) if mask[i, t] > 0]
        a = float(advantages[i])
        log_s = sum(float(logps[i, t] - old[i, t]) for t in tokens) / len(tokens)
        answer = 0.0
        for t in tokens:
            w = math.exp(float(logps[i, t] - old[i, t])) if level == "token" else math.exp(log_s)
            objective = min(w * a, min(max(w, 1 - eps_low), 1 + eps_high) * a)
            q = math.exp(float(ref[i, t] - logps[i, t]))
            answer += objective - beta * (q - math.log(q) - 1)
        total += answer / len(tokens)
    return -total / logps.shape[0]


@pytest.mark.parametrize("level,eps_low,eps_high,beta", [("token", 0.2, 0.28, 0.0), ("token", 0.2, 0.2, 0.04),
                                                         ("sequence", 3e-4, 4e-4, 0.0), ("sequence", 0.1, 0.1, 0.1)])
def test_loss_equals_restated_formula(level, eps_low, eps_high, beta):
    logps, old, ref, mask, advantages = _inputs()
    result = clipped_policy_loss(logps, old, advantages, mask, level=level, eps_low=eps_low, eps_high=eps_high,
                                 beta=beta, ref_logps=ref)  # fmt: skip
    expected = _restated(logps.detach(), old, ref, mask, advantages, level, eps_low, eps_high, beta)
    assert result.per_answer.mean().item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (result.kl is None) == (beta == 0)


def test_on_policy_ratio_is_one_and_gradient_is_advantage_weighted():
    """One update per generation batch: pi_old = pi, ratios 1, grad of the loss = -(1/B) A_i / |y_i| per token."""
    logps, _, _, mask, advantages = _inputs()
    for level in ("token", "sequence"):
        logps.grad = None
        result = clipped_policy_loss(logps, logps.detach(), advantages, mask, level=level, eps_low=3e-4,
                                     eps_high=4e-4)  # fmt: skip
        result.per_answer.mean().backward()
        expected = -(advantages.unsqueeze(1) * mask / mask.sum(1, keepdim=True)) / 4
        torch.testing.assert_close(logps.grad, expected)
        assert result.clipped.sum() == 0


def _trl_loss(logps, old, ref, mask, advantages, level, eps_low, eps_high, beta):
    """TRL 1.16's GRPOTrainer._compute_loss on these tensors: a trainer built without __init__, with the attributes
    that method reads set by hand and its log-prob forward replaced by the given log-probs."""
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    settings = {"loss_type": "grpo", "importance_sampling_level": level, "epsilon_low": eps_low,
                "epsilon_high": eps_high, "beta": beta, "top_entropy_quantile": 1.0, "off_policy_mask_threshold": None,
                "use_vllm": False, "aux_loss_enabled": False, "_entropy_bonus_enabled": False,
                "current_gradient_accumulation_steps": 1, "model": torch.nn.Linear(1, 1).train(),
                "args": SimpleNamespace(use_bias_correction_kl=False, delta=None),
                "accelerator": SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x),
                "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)}}  # fmt: skip
    trainer.__dict__.update(settings)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    batch, length = logps.shape
    inputs = {"prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2),
              "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}  # fmt: skip
    return trainer._compute_loss(None, inputs)


@pytest.mark.parametrize("level,eps_low,eps_high,beta", [("token", 0.2, 0.28, 0.0), ("token", 0.2, 0.2, 0.04),
                                                         ("sequence", 3e-4, 4e-4, 0.0), ("sequence", 0.1, 0.1, 0.1)])
def test_loss_and_gradient_equal_trl(level, eps_low, eps_high, beta):
    logps, old, ref, mask, advantages = _inputs(seed=3)
    ours = clipped_policy_loss(logps, old, advantages, mask, level=level, eps_low=eps_low, eps_high=eps_high,
                               beta=beta, ref_logps=ref).per_answer.mean()  # fmt: skip
    (our_grad,) = torch.autograd.grad(ours, logps)
    theirs = _trl_loss(logps, old, ref, mask, advantages, level, eps_low, eps_high, beta)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def test_clipping_is_active_on_these_inputs():
    """The TRL comparison above would be weak if nothing were clipped: the inputs clip some tokens and answers."""
    logps, old, _, mask, advantages = _inputs(seed=3)
    token = clipped_policy_loss(logps, old, advantages, mask, level="token", eps_low=0.2, eps_high=0.28)
    sequence = clipped_policy_loss(logps, old, advantages, mask, level="sequence", eps_low=3e-4, eps_high=4e-4)
    assert 0 < token.clipped.sum() and 0 < sequence.clipped.sum()


@pytest.mark.parametrize("level,eps_low,eps_high", [("token", 0.2, 0.28), ("sequence", 3e-4, 4e-4)])
def test_clipped_share_counts_only_the_clips_that_bind(level, eps_low, eps_high):
    """The logged share: a token (or answer) counts when the clip takes effect in min(w A, clip(w) A), i.e. w below
    1 - eps_low with A < 0, or w above 1 + eps_high with A > 0 (TRL's low / high clip ratios), over answer tokens."""
    logps, old, _, mask, advantages = _inputs(seed=3)
    result = clipped_policy_loss(logps, old, advantages, mask, level=level, eps_low=eps_low, eps_high=eps_high)
    delta = (logps - old).detach()
    if level == "sequence":
        delta = ((delta * mask).sum(1) / mask.sum(1)).unsqueeze(1).expand_as(mask)
    ratio, adv = delta.exp(), advantages.unsqueeze(1).expand_as(mask)
    binds = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    expected = (binds.float() * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(result.clipped, expected)
    assert 0 < expected.sum() < expected.numel()
