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
from ivl.errors import ConfigError
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


# --- SFT: the loss and its gradient in one pass -----------------------------------------------------------------------
# In SFT every supervised target's weight is known before the forward pass (from the collated labels), so the gradient
# of the weighted cross-entropy with respect to the hidden states (and lm_head's weight, when it trains) can be
# computed chunk by chunk in the forward pass, while the chunk's logits are at hand, and kept instead of the logits: no
# second projection in the backward pass, one softmax pass per chunk. MPO and RL cannot do this: their per-token
# upstream gradients depend on the sequence sums they compute from these log-probs, so they use `token_logps`.

# Bytes of loss temporaries per chunk on the CPU (and where free device memory cannot be read): the memory bound of
# the recomputing `token_logps` (3 live copies of LOGITS_CHUNK_ELEMENTS fp32 logits), so memory stays flat in rows.
LOSS_CHUNK_BYTES = 3 * 4 * LOGITS_CHUNK_ELEMENTS
# On CUDA: this share of the free memory (the driver's free bytes + the caching allocator's unused ones), at most
# CUDA_LOSS_CHUNK_MAX_BYTES (beyond a few thousand rows a larger chunk does not make the matmuls faster).
CUDA_LOSS_CHUNK_SHARE, CUDA_LOSS_CHUNK_MAX_BYTES = 0.25, 2 * 2**30


def loss_chunk_rows(vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows of logits projected at once by `linear_cross_entropy`: its byte budget over the bytes a row's temporaries
    take (fp32 logits and log-probs, plus the logits and the logit gradient in `dtype` when it is narrower)."""
    budget = LOSS_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(CUDA_LOSS_CHUNK_MAX_BYTES, int(CUDA_LOSS_CHUNK_SHARE * (free + cached)))
    itemsize = torch.finfo(dtype).bits // 8
    row_bytes = vocab_size * (8 + (2 * itemsize if itemsize < 4 else 0))
    return max(1, budget // row_bytes)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i weights[i] * CE(hidden[i] @ weight.T + bias, targets[i]) with its gradients computed in the forward pass,
    `rows` positions at a time; backward only scales them by the upstream gradient.

    With p = softmax(logits) of a row and w its weight, d(w CE)/d logits = w (p - onehot(target)), so
    d/d hidden = w (p - onehot) @ weight and d/d weight = sum over rows of (p - onehot)^T (w hidden): the weight w is
    folded into the [rows, H] side, so the [rows, V] chunk sees only log_softmax, exp and one subtraction per row."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, rows):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        for start in range(0, hidden.shape[0], rows):
            piece, piece_targets = hidden[start : start + rows].to(weight.dtype), targets[start : start + rows]
            piece_weights = weights[start : start + rows].float()
            logps = torch.log_softmax(F.linear(piece, weight, bias).float(), dim=1)  # [n, V]
            index = torch.arange(piece_targets.shape[0], device=logps.device)
            total -= (piece_weights * logps[index, piece_targets]).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            dlogits = logps.exp_()  # softmax, in place
            dlogits[index, piece_targets] -= 1.0  # (p - onehot): the weights are applied on the narrow side below
            dlogits = dlogits.to(weight.dtype)
            scale = piece_weights[:, None]
            if want_hidden:
                grad_hidden[start : start + rows] = (scale * (dlogits @ weight).float()).to(hidden.dtype)
            if want_weight:
                scaled = (scale * piece.float()).to(weight.dtype)
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(dlogits.t(), scaled)
                else:  # accumulated in fp32 over the chunks
                    grad_weight.add_(dlogits.t() @ scaled)
            if want_bias:
                grad_bias.add_((scale * dlogits.float()).sum(0))
        ctx.grads = (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                     None if grad_bias is None else grad_bias.to(bias.dtype))  # fmt: skip
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = tuple(None if grad is None else grad * grad_total.to(grad.dtype) for grad in ctx.grads)
        ctx.grads = None  # each is used once (a second backward through this graph would need retain_graph anyway)
        return (*grads, None, None, None)


def _plain_linear(lm_head: nn.Module) -> bool:
    """lm_head is an ordinary nn.Linear whose weight is a local tensor (not a PEFT wrapper, a quantised linear, or an
    FSDP shard): `linear_cross_entropy` may then read its weight and bias directly."""
    return (
        isinstance(lm_head, nn.Linear)
        and type(lm_head).forward is nn.Linear.forward
        and type(lm_head.weight.data) is torch.Tensor
    )


def linear_cross_entropy(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, kernel: str = "torch"
) -> torch.Tensor:
    """sum_i weights[i] * CE(lm_head(hidden[i]), targets[i]) in fp32: hidden [N, H], targets and weights [N] (the
    supervised positions of `supervised_tokens` and their `supervised_weights`). Divide by the step's denominator.

    Memory stays flat in N: `loss_chunk_rows` rows of logits exist at a time, and what is kept for the backward pass is
    the gradient ([N, H], like `hidden`), not logits. kernel="liger": Liger's fused linear cross-entropy (Triton, CUDA;
    `check_loss_kernel` says when it can run). A wrapped lm_head (PEFT, 4-bit, FSDP shard) falls back to
    `token_logps`, which recomputes each chunk's logits in the backward pass."""
    if not _plain_linear(lm_head):
        return weighted_nll(token_logps(lm_head, hidden, targets), to_device(weights, hidden.device), 1.0)
    if kernel == "liger":
        return _liger_cross_entropy(lm_head, hidden, targets, weights)
    weights = to_device(weights, hidden.device)
    rows = loss_chunk_rows(lm_head.out_features, lm_head.weight.dtype, hidden.device)
    return _LinearCrossEntropy.apply(hidden, lm_head.weight, lm_head.bias, targets, weights, rows)


def check_loss_kernel(kernel: str, device: torch.device) -> None:
    """Refuse loss.kernel=liger where it cannot run (no CUDA device, or liger-kernel not installed)."""
    if kernel != "liger":
        return
    if device.type != "cuda":
        raise ConfigError(f"loss.kernel=liger runs on CUDA only (this run is on {device.type}); use loss.kernel=torch")
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError as error:
        message = f"loss.kernel=liger needs the liger-kernel package ({error}); use loss.kernel=torch"
        raise ConfigError(message) from None


def _liger_cross_entropy(
    lm_head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The weighted sum through Liger's kernel, which takes per-class, not per-token, weights: one call per distinct
    weight (one for loss.reduction=token; for sample / square, one per sub-sample length), each summed and scaled."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    values, groups = torch.unique(weights.cpu(), return_inverse=True)  # from the CPU labels: no device sync
    for group, value in enumerate(values.tolist()):
        chosen = slice(None) if len(values) == 1 else to_device((groups == group).nonzero()[:, 0], hidden.device)
        part = liger_fused_linear_cross_entropy(hidden[chosen], lm_head.weight, targets[chosen], lm_head.bias,
                                                ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        total = total + value * part.float()
    return total


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
