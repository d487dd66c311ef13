"""The model side of preference training (docs/design/mpo.md): sequence log-probs of [chosen; rejected] rows with the
ViT run once per pair, the reference policy without a second model, reference log-probs precomputed to disk, and the
reward shift.

    logps = pair_logps(model, inputs, labels)              # policy, [2B] sums over each answer's tokens
    ref = ReferencePolicy(model, frozen_copy=None)(inputs, labels)   # adapters disabled: the base, no copy

Log-probs come from the LLM's final hidden states through `ivl.losses.token_logps`, which projects only the
answer positions a chunk at a time: no [2B, T, V] logits tensor ever exists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader

from ivl.config import ConfigError
from ivl.data.preference import PairDataset, collate_pairs
from ivl.data.samples import model_inputs
from ivl.evaluate import _Shard
from ivl.losses import supervised_tokens, token_logps
from ivl.model.adapters import load_adapter_onto
from ivl.model.forward import final_hidden_states, output_layer
from ivl.model.partial_lora import attach_partial_lora, read_marker
from ivl.model.parts import model_parts
from ivl.outputs import temporary_path, write_error


@dataclass
class SequenceLogps:
    """Per-row sums [R] of the supervised tokens' log-probs, and the tokens' own log-probs [N] with their rows [N]."""

    sums: torch.Tensor
    token_logps: torch.Tensor
    rows: torch.Tensor


@contextmanager
def image_features_twice(model: nn.Module) -> Iterator[None]:
    """Within this block, a forward over [chosen rows; rejected rows] whose `pixel_values` are the chosen rows' tiles
    only runs the ViT and projector once: the projector's output [tiles, tokens, D] is repeated, so its features fill
    the chosen rows' image tokens and then the rejected rows' (the same images in the same order). Gradients from both
    halves flow back into the one pass. A hook on the projector rather than passing precomputed features
    (`mm_encoder_outputs` exists only from transformers 5.23 on; the kit supports 5.x). Outside a DDP wrapper's
    bookkeeping nothing changes: DDP all-reduces from hooks on each parameter's gradient accumulator (the two-process
    test checks the ViT and projector weights)."""

    def twice(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([output, output])

    handle = model_parts(model).projector.register_forward_hook(twice)
    try:
        yield
    finally:
        handle.remove()


def pair_logps(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> SequenceLogps:
    """Log-probs of the answers of a pair batch: `inputs` as `model_inputs` gives them for `collate_pairs` rows,
    labels [2B, T] unshifted. Differentiable when grad is enabled."""
    with image_features_twice(model):
        hidden = final_hidden_states(model, inputs)  # [2B, T, H]
    tokens = supervised_tokens(hidden, labels)
    logps = token_logps(output_layer(model), tokens.hidden, tokens.targets)  # [N] fp32
    sums = torch.zeros(labels.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, tokens.rows, logps)
    return SequenceLogps(sums, logps, tokens.rows)


class ReferencePolicy:
    """log pi_ref of pair batches: the trained model with its adapters disabled (PEFT's `disable_adapter`, which also
    switches `modules_to_save` parts back to their original weights and skips partial LoRA), so LoRA / QLoRA /
    partial LoRA need no second model; or `frozen_copy`, the starting weights of a fully trained model; or, with
    `disable_adapters=False`, the model as it is now (a continued SFT adapter, whose log-probs are precomputed before
    the first update). Always in eval mode: the reference must not see dropout."""

    def __init__(self, model: nn.Module, frozen_copy: nn.Module | None = None, disable_adapters: bool = True):
        if frozen_copy is None and disable_adapters and not isinstance(model, PeftModel):
            raise ValueError("a model without adapters needs a frozen copy as its reference")
        self.model = model
        self.frozen_copy = frozen_copy
        self.disable_adapters = disable_adapters

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        if self.frozen_copy is not None:
            return pair_logps(self.frozen_copy, inputs, labels).sums
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if self.disable_adapters else nullcontext():
                return pair_logps(self.model, inputs, labels).sums
        finally:
            self.model.train(was_training)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of a fully trained model's starting weights (the only case that needs one)."""
    import copy

    reference = copy.deepcopy(model).eval()
    return reference.requires_grad_(False)


def continue_adapter(model: nn.Module, adapter_dir: str | Path, base_name: str) -> PeftModel:
    """`model` (the base `base_name`) with a run's trained adapter loaded trainable (SFT -> MPO), partial LoRA
    restored from its marker; trainable weights in fp32 as `apply_trainability` keeps them."""
    peft_model = load_adapter_onto(model, adapter_dir, base_name, trainable=True)
    marker = read_marker(adapter_dir)
    if marker is not None:
        attach_partial_lora(peft_model, marker["image_token_id"])
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of every weight (name, shape, sum, sum of squares): a changed model or adapter changes it."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            values = parameter.detach().double()
            digest.update(f"{name}{tuple(parameter.shape)}{values.sum().item():.10e}{values.square().sum().item():.10e}"
                          .encode())  # fmt: skip
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    reference: ReferencePolicy,
    dataset: PairDataset,
    accelerator: Accelerator,
    batch_size: int,
    pad_token_id: int,
    dtype,
) -> torch.Tensor:
    """Reference log-probs [num_pairs, 2] (chosen, rejected) of every pair, in one pass split over the processes.
    Pairs a process skips (bad rows under on_error=skip) stay 0; training never reads them."""
    table = torch.zeros(len(dataset), 2, dtype=torch.float64, device=accelerator.device)
    shard = _Shard(dataset, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=partial(collate_pairs, pad_token_id=pad_token_id))
    for batch in loader:
        if batch["input_ids"] is None:
            continue
        inputs = model_inputs(batch, accelerator.device, dtype)
        labels = inputs.pop("labels")
        with accelerator.autocast():
            sums = reference(inputs, labels)
        pairs = len(batch["indices"])
        table[torch.tensor(batch["indices"], device=table.device)] = torch.stack(
            [sums[:pairs], sums[pairs:]], 1
        ).double()
    return accelerator.reduce(table, "sum").float()


def held_out_preference(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """Log-probs [N, 2] (chosen, rejected) of N held-out pairs under the policy and the reference -> the implicit
    rewards r = beta * (log pi - log pi_ref): {"eval_rewards_accuracy": share of pairs with r_chosen > r_rejected
    (strictly: a tie, as at the start where pi = pi_ref, is not counted; TRL counts the same way),
    "eval_rewards_margin": mean of r_chosen - r_rejected}."""
    rewards = beta * (policy.double() - reference.double())
    margins = rewards[:, 0] - rewards[:, 1]
    return {"eval_rewards_accuracy": (margins > 0).double().mean().item(), "eval_rewards_margin": margins.mean().item()}


def reference_cache_key(parts: dict[str, Any], reference_model: nn.Module) -> str:
    """What precomputed reference log-probs depend on: the data (files, settings), the model and its weights."""
    text = json.dumps(parts, sort_keys=True, default=str) + weights_fingerprint(reference_model)
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_compute_reference(path: Path, key: str, compute, accelerator: Accelerator) -> torch.Tensor:
    """The cached table at `path` when its key matches; computed and cached when absent; a stale cache is refused."""
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached["key"] != key:
            raise ConfigError(
                f"{path} holds reference log-probs of other data or another model (key mismatch): delete it, or set "
                "mpo.reference_cache to a new file"
            )
        return cached["logps"].to(accelerator.device)
    table = compute()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        try:
            with tmp.open("wb") as handle:
                torch.save({"key": key, "logps": table.cpu()}, handle)
            tmp.replace(path)  # atomic: a crash never leaves a half-written cache
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise write_error(path, error) from error
    accelerator.wait_for_everyone()
    return table


@dataclass
class RewardShift:
    """BCO's reward shift delta (docs/design/mpo.md): the running mean of every reward (r_c and r_r) seen so far.
    Updated once per optimizer step with the step's global reward sum and count (all micro-batches, all processes),
    saved in checkpoints."""

    mean: float = 0.0
    count: float = 0.0

    def update(self, reward_sum: float, reward_count: float) -> None:
        if reward_count > 0:
            total = self.count + reward_count
            self.mean += (reward_sum - self.mean * reward_count) / total
            self.count = total

    def state(self) -> dict[str, float]:
        return {"reward_shift": self.mean, "reward_shift_count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RewardShift:
        return cls(state.get("reward_shift", 0.0), state.get("reward_shift_count", 0.0))
