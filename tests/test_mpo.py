"""MPO: the loss against TRL and the SPEC formula, the reward shift, the reference policy, the shared-image forward,
preference data, and the recipe end to end on a tiny model."""

from types import SimpleNamespace

import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from finetune.losses import mpo_loss


def _trl_mpo_loss(policy_tokens, ref_chosen, ref_rejected, completion_mask, beta):
    """TRL's own DPOTrainer loss (`_compute_loss`) with loss_type=["sigmoid", "bco_pair", "sft"], weights
    [0.8, 0.2, 1.0] and precomputed reference log-probs; the model is a stand-in that returns the given per-token
    log-probs [2B, T-1] (rows: chosen then rejected), so only TRL's loss arithmetic runs."""
    rows, length = policy_tokens.shape
    outputs = SimpleNamespace(
        log_probs=policy_tokens,
        entropy=torch.zeros(rows, length),
        mean_logits=torch.zeros(rows, length),
        is_top1=torch.zeros(rows, length, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": __import__("collections").defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(rows, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, length + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)


def _preference_batch(pairs=4, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, length + 1, dtype=torch.long)
    for row in range(2 * pairs):
        completion_mask[row, 3 + row % 3 :] = 1  # prompts of different lengths
    mask = completion_mask[:, 1:].float()
    tokens = -torch.rand(2 * pairs, length, generator=generator) * 3 * mask  # TRL's log_probs are 0 off the answer
    ref = (tokens + 0.5 * torch.randn(2 * pairs, length, generator=generator) * mask).sum(1)
    return tokens, ref, completion_mask, mask


def test_mpo_loss_without_shift_equals_trls_sigmoid_bco_pair_sft_combination():
    tokens, ref, completion_mask, mask = _preference_batch()
    pairs = tokens.shape[0] // 2
    beta = 0.1
    expected = _trl_mpo_loss(tokens, ref[:pairs], ref[pairs:], completion_mask, beta)
    sequence = tokens.sum(1)
    sft_loss = -tokens[:pairs][mask[:pairs].bool()].mean()  # the chosen answers' token-averaged NLL
    loss, metrics = mpo_loss(sequence[:pairs], sequence[pairs:], ref[:pairs], ref[pairs:], sft_loss, beta=beta)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    chosen, rejected = beta * (sequence[:pairs] - ref[:pairs]), beta * (sequence[pairs:] - ref[pairs:])
    assert metrics["rewards_accuracy"].item() == (chosen > rejected).float().mean().item()
    assert metrics["reward_sum"].item() == pytest.approx((chosen.sum() + rejected.sum()).item(), rel=1e-6)
    assert metrics["reward_count"].item() == 2 * pairs


def test_mpo_loss_with_shift_equals_the_spec_formula():
    policy_chosen, policy_rejected = torch.tensor([-3.0, -5.0, -2.5]), torch.tensor([-4.0, -4.5, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0, -3.0]), torch.tensor([-3.0, -5.0, -5.5])
    sft_loss, beta, delta = torch.tensor(0.7), 0.5, 0.3
    loss, _ = mpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, sft_loss, beta=beta,
                       weights=(0.8, 0.2, 1.0), reward_shift=delta)  # fmt: skip
    total = 0.0
    for pc, pr, rc_ref, rr_ref in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected, strict=True):
        r_c, r_r = beta * (pc - rc_ref), beta * (pr - rr_ref)
        l_pref = -torch.log(torch.sigmoid(r_c - r_r))
        l_qual = -torch.log(torch.sigmoid(r_c - delta)) - torch.log(torch.sigmoid(-(r_r - delta)))
        total += (0.8 * l_pref + 0.2 * l_qual) / 3
    assert loss.item() == pytest.approx((total + 0.7).item(), rel=1e-6)
    unshifted, _ = mpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, sft_loss, beta=beta)
    assert unshifted.item() != pytest.approx(loss.item(), rel=1e-4)  # the shift matters
