"""Mixed Preference Optimization of an InternVL model (docs/design/mpo.md): L = w_p * DPO + w_q * BCO (reward shift) +
w_g * SFT.

    ivl mpo configs/mpo/demo.yaml loop.max_steps=200
    ivl mpo configs/mpo/internvl3_1b_lora.yaml mpo.precompute_reference=true      # reference log-probs cached first
    accelerate launch -m ivl.finetune.mpo configs/mpo/internvl3_1b_lora.yaml          # DDP on several GPUs

setup -> train -> save, with SFT's conventions (progress bar, metrics.jsonl, atomic checkpoints, resume, final
adapter / model export): the loop skeleton is `ivl.loop`'s, the model setup, evaluation and export `ivl.training`'s.
What differs:
- data are preference pairs; both answers of a pair share one ViT pass (`ivl.finetune.preference.pair_logps`);
- the reference policy is the trained model with its adapters disabled (LoRA / QLoRA / partial LoRA), a frozen copy
  only for full fine-tuning, or log-probs precomputed once and cached on disk (required when continuing an SFT
  adapter: the reference is then the SFT policy, which disabling the adapter would not give);
- the reward shift delta is the running mean of all past rewards, updated once per optimizer step over the global
  batch and saved with every checkpoint.
Losses of a step are normalised globally: the preference terms by the step's pair count, the SFT term by its
chosen-answer token count (all micro-batches, all processes), so a step's update does not depend on how it is split.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ivl.config import ConfigError, to_dict
from ivl.data.chat import SampleError
from ivl.data.checks import check_data
from ivl.data.loader import StepBatchSampler
from ivl.data.preference import PairDataset, collate_pairs
from ivl.data.samples import SampleBuilder, SFTDataset, load_records, model_inputs
from ivl.finetune.options import MPOConfig
from ivl.finetune.preference import (
    ReferencePolicy,
    RewardShift,
    compute_reference_logps,
    continue_adapter,
    frozen_copy,
    held_out_preference,
    load_or_compute_reference,
    pair_logps,
    reference_cache_key,
)
from ivl.loop import RunResult, TrainingLoop, TrainState, accumulate_and_step, count_steps, run_recipe
from ivl.losses import mpo_loss, num_supervised_tokens
from ivl.model.adapters import apply_trainability, format_report, is_peft, trainable_report
from ivl.model.checkpoint import read_training_info
from ivl.model.integrity import weights_fingerprint
from ivl.model.load import load_model, resolve_dtype
from ivl.model.moe import load_balancing_loss, router_aux_coefficient, router_logits_caught
from ivl.model.quantize import keep_training_layout
from ivl.recipe import recipe_main
from ivl.runtime import (
    MetricsLog,
    build_optimizer,
    build_scheduler,
    make_accelerator,
    start_trackers,
)
from ivl.training import checked_dataset, enable_gradient_checkpointing, evaluate, optimizer_groups, save

METRICS = ("loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


@dataclass
class Run:
    """Everything `setup` builds for the loop (the fields `ivl.training.evaluate` reads included)."""

    config: MPOConfig
    accelerator: Accelerator
    model: nn.Module
    tokenizer: Any
    builder: SampleBuilder
    train_set: PairDataset
    validation_set: SFTDataset | None
    reference: ReferencePolicy | None  # None: precomputed
    reference_logps: torch.Tensor | None  # [num_pairs, 2] (chosen, rejected) when precomputed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    dtype: torch.dtype
    metrics: MetricsLog
    info: dict[str, Any]
    router_losses: list[torch.Tensor] = field(default_factory=list)  # this logging window's (MoE LLM), for the metrics
    validation_pairs: PairDataset | None = None  # mpo.validation_pairs
    validation_reference: torch.Tensor | None = None  # [pairs, 2] their reference log-probs (chosen, rejected)


def _checked_pairs(path: str, builder: SampleBuilder, accelerator: Accelerator, seed: int) -> PairDataset:
    """Every pair checked before training (both sides): bad rows fail the run with the report, or are left out."""
    report = check_data(path, builder, progress=accelerator.is_main_process and sys.stderr.isatty())
    if not report.clean and builder.data.on_error == "fail":
        raise SampleError(f"the data check failed; fix these rows or set data.on_error=skip\n{report.format()}")
    bad = {location for location, _ in report.bad_rows}
    records = load_records(path, seed, builder.data.image_root)
    dataset = PairDataset([record for record in records if record.location not in bad], builder)
    dataset.num_left_out = len(report.bad_rows)
    return dataset


def _build_model(config: MPOConfig, accelerator: Accelerator) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The policy to train: a fresh adapter / trainable parts as the config says, or an SFT run's adapter continued."""
    info = {"recipe": "mpo", "base_model": to_dict(config.model), "qlora": config.adapter.qlora,
            "adapter_kind": config.adapter.kind, "modes": config.modes()}  # fmt: skip
    if config.mpo.init_adapter:
        info.update({k: v for k, v in read_training_info(config.mpo.init_adapter).items() if k != "base_model"})
        info["recipe"] = "mpo"
    model, tokenizer = load_model(config.model, accelerator.device, quantize_llm=bool(info["qlora"]))
    info["base_fingerprint"] = weights_fingerprint([model])  # of the base as loaded, before any adapter or update
    if info["qlora"]:
        keep_training_layout(model)
    enable_gradient_checkpointing(model, config)
    if config.mpo.init_adapter:
        model = continue_adapter(model, config.mpo.init_adapter, config.model.name_or_path)
    else:
        model = apply_trainability(model, config.modes(), config.vision, config.adapter)
    accelerator.print(format_report(trainable_report(model, info["modes"])))
    return model, tokenizer, info


def _reference_logps(config: MPOConfig, run_parts: dict[str, Any], reference: ReferencePolicy) -> torch.Tensor:
    accelerator, dataset = run_parts["accelerator"], run_parts["train_set"]
    path = Path(config.mpo.reference_cache or Path(config.loop.output_dir) / "reference_logps.pt")
    key_parts = {"data": to_dict(config.data), "model": to_dict(config.model), "init": config.mpo.init_adapter,
                 "records": [r.location for r in dataset.records]}  # fmt: skip
    key = reference_cache_key(key_parts, reference.frozen_copy or reference.model)
    pad = run_parts["tokenizer"].pad_token_id
    compute = partial(compute_reference_logps, reference, dataset, accelerator, config.eval.batch_size, pad,
                      run_parts["dtype"])  # fmt: skip
    accelerator.print(f"reference log-probs: {path}")
    return load_or_compute_reference(path, key, compute, accelerator)


def setup(config: MPOConfig) -> Run:
    loop = config.loop
    Path(loop.output_dir).mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(config.model.dtype)
    accelerator = make_accelerator(loop, dtype)
    if accelerator.is_fsdp2:  # the reference pass and the shared ViT features are untested on sharded weights
        raise ConfigError("MPO runs on one process or under DDP (configs/accelerate/ddp.yaml); FSDP2 is SFT-only")
    model, tokenizer, info = _build_model(config, accelerator)
    builder = SampleBuilder(tokenizer, model.config, config.data)
    train_set = _checked_pairs(config.data.train, builder, accelerator, config.data.seed)
    validation_set = None  # SFT-format data: validation loss and exact-match, as in SFT
    if config.data.validation:
        validation_set = checked_dataset(config.data.validation, builder, accelerator, config.data.seed)
    optimizer = build_optimizer(optimizer_groups(model, config), config.optim)
    total_steps = count_steps(loop, train_set, accelerator.num_processes)
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Adapters disabled give the starting policy; only a model without adapters needs a copy of its weights.
    policy = accelerator.unwrap_model(model)
    if config.mpo.init_adapter:  # the reference is the SFT policy itself, before any update
        reference = ReferencePolicy(policy, disable_adapters=False)
    else:
        reference = ReferencePolicy(policy, None if is_peft(policy) else frozen_copy(policy))
    validation_pairs = validation_reference = None
    if config.mpo.validation_pairs:  # the reference never changes: its log-probs of these pairs are computed once
        validation_pairs = _checked_pairs(config.mpo.validation_pairs, builder, accelerator, config.data.seed)
        validation_reference = compute_reference_logps(reference, validation_pairs, accelerator, config.eval.batch_size,
                                                       tokenizer.pad_token_id, dtype)  # fmt: skip
    reference_logps = None
    if config.mpo.precompute_reference:
        parts = {"accelerator": accelerator, "train_set": train_set, "tokenizer": tokenizer, "dtype": dtype}
        reference_logps = _reference_logps(config, parts, reference)
        reference = None  # nothing of the reference is kept: a full model's copy is freed here
    info["data"] = {k: v for k, v in to_dict(config.data).items() if k not in ("train", "validation")}
    info["mpo"] = to_dict(config.mpo)
    metrics = MetricsLog(Path(loop.output_dir) / "metrics.jsonl", accelerator)
    start_trackers(accelerator, "ivl-mpo", to_dict(config))
    return Run(config, accelerator, model, tokenizer, builder, train_set, validation_set, reference, reference_logps,
               optimizer, scheduler, total_steps, dtype, metrics, info, validation_pairs=validation_pairs,
               validation_reference=validation_reference)  # fmt: skip


def forward_loss(run: Run, batch: dict[str, Any], shift: float, pairs_per_process: torch.Tensor,
                 tokens_per_process: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """This micro-batch's share of the step loss, and its sums [len(METRICS) + 2] for logging and the shift:
    pairs x each metric, then the reward sum and count."""
    if batch["input_ids"] is None:  # every row skipped: a zero loss that still touches every trainable weight (DDP)
        zero = sum(p.sum() for p in run.model.parameters() if p.requires_grad) * 0.0
        return zero, torch.zeros(len(METRICS) + 2, device=run.accelerator.device)
    inputs = model_inputs(batch, run.accelerator.device, run.dtype)
    labels = inputs.pop("labels")
    pairs = len(batch["indices"])
    with router_logits_caught(run.model, enabled=run.info["modes"]["llm"] != "frozen") as router_logits:
        policy = pair_logps(run.model, inputs, labels)  # [2B]: chosen rows, then rejected rows
    if run.reference_logps is not None:
        ref = run.reference_logps[torch.tensor(batch["indices"], device=labels.device)].T.flatten()
    else:
        ref = run.reference(inputs, labels)
    # mpo_loss averages over this micro-batch; `scale` turns that into its share of the step's global pair average,
    # and the SFT term is divided back by it so it stays a sum over chosen tokens / the step's chosen-token count.
    scale = pairs / pairs_per_process
    chosen_nll = -policy.token_logps[policy.rows < pairs].sum()
    options = run.config.mpo
    loss, metrics = mpo_loss(policy.sums[:pairs], policy.sums[pairs:], ref[:pairs], ref[pairs:],
                             chosen_nll / tokens_per_process / scale, beta=options.beta,
                             weights=(options.preference_weight, options.quality_weight, options.generation_weight),
                             reward_shift=shift)  # fmt: skip
    metrics["loss"] = loss.detach()
    sums = torch.stack([metrics[name] * pairs for name in METRICS] + [metrics["reward_sum"], metrics["reward_count"]])
    if router_logits:  # a mixture-of-experts LLM that trains: its routers' load-balancing loss, as in SFT
        aux = load_balancing_loss(run.model, router_logits, inputs.get("attention_mask"))
        run.router_losses.append(aux.detach())
        return loss * scale + router_aux_coefficient(run.model) * aux / run.config.loop.grad_accum, sums
    return loss * scale, sums


def optimizer_step(run: Run, window: list[dict[str, Any]], shift: RewardShift, step: int) -> dict[str, float] | None:
    """Forward + backward over the step's micro-batches, one optimizer update, one reward-shift update (step number
    `step`); returns the step's metrics (pair-weighted means over all processes), or None when the step was not
    finite and skipped (loop.on_nonfinite=skip: neither the weights nor the reward shift take it)."""
    accelerator = run.accelerator
    kept = [b for b in window if b["input_ids"] is not None]
    local_pairs = sum(len(b["indices"]) for b in kept)
    local_tokens = sum(num_supervised_tokens(b["labels"][: len(b["indices"])]) for b in kept)  # chosen rows only
    counts = torch.tensor([local_pairs, local_tokens], dtype=torch.float32, device=accelerator.device)
    global_pairs, global_tokens = accelerator.reduce(counts, "sum")
    # DDP averages gradients over processes, so each process divides by the global counts / num_processes.
    pairs_per_process = global_pairs.clamp(min=1) / accelerator.num_processes
    tokens_per_process = global_tokens.clamp(min=1) / accelerator.num_processes
    sums = torch.zeros(len(METRICS) + 2, device=accelerator.device)

    def forward(batch: dict[str, Any]) -> torch.Tensor:
        loss, batch_sums = forward_loss(run, batch, shift.mean, pairs_per_process, tokens_per_process)
        sums.add_(batch_sums.float())
        return loss

    if not accumulate_and_step(run, window, forward, step).applied:
        return None
    sums = accelerator.reduce(sums.double(), "sum")
    step_metrics = {name: (sums[i] / global_pairs.clamp(min=1)).item() for i, name in enumerate(METRICS)}
    if run.config.mpo.reward_shift:
        shift.update(sums[-2].item(), sums[-1].item())
    return step_metrics


def train(run: Run) -> dict[str, float]:
    """The training loop; returns the last logged and evaluated metrics."""
    layout = {"train_samples": len(run.train_set), "recipe": "mpo"}
    loop = TrainingLoop(run, "mpo", layout, TrainState(skipped_rows=run.train_set.num_left_out))
    batches = loop.start(partial(training_batches, run))
    shift = RewardShift.from_state(loop.state.recipe)
    window_metrics, tokens = [], 0
    for window in loop.steps(batches):
        tokens += sum(int(b["attention_mask"].sum()) for b in window if b["input_ids"] is not None)
        step_metrics = optimizer_step(run, window, shift, loop.state.step)
        if step_metrics is None:  # loop.on_nonfinite=skip
            loop.state.nonfinite_steps += 1
        else:
            window_metrics.append(step_metrics)
        if loop.log_due():
            # A window whose every step was skipped (loop.on_nonfinite=skip) logs no loss.
            means = {name: sum(m[name] for m in window_metrics) / len(window_metrics)
                     for name in METRICS if window_metrics}  # fmt: skip
            if run.router_losses:  # mixture-of-experts LLM: the load-balancing loss (unweighted), mean of the window
                means["router_aux_loss"] = run.accelerator.reduce(torch.stack(run.router_losses).mean(), "mean").item()
                run.router_losses.clear()
            values = {**means, "reward_shift": shift.mean, "tokens_per_second": loop.per_second(tokens),
                      "skipped_rows": loop.state.skipped_rows}  # fmt: skip
            loop.log(values, show=("loss", "rewards_accuracy", "rewards_margin"))
            window_metrics, tokens = [], 0
        if loop.eval_due():
            loop.last.update({**evaluate(run, loop.state.step), **evaluate_pairs(run, loop.state.step)})
        if loop.save_due():
            loop.save(shift.state())
    loop.last.update({**evaluate(run, loop.state.step), **evaluate_pairs(run, loop.state.step)})
    return loop.last


def evaluate_pairs(run: Run, step: int) -> dict[str, float]:
    """Reward accuracy and margin of the policy as it is now on mpo.validation_pairs (`held_out_preference`), written
    to the metrics; {} without validation pairs."""
    if run.validation_pairs is None:
        return {}
    policy = ReferencePolicy(run.accelerator.unwrap_model(run.model), disable_adapters=False)  # eval mode, no grad
    logps = compute_reference_logps(policy, run.validation_pairs, run.accelerator, run.config.eval.batch_size,
                                    run.tokenizer.pad_token_id, run.dtype)  # fmt: skip
    results = held_out_preference(logps, run.validation_reference, run.config.mpo.beta)
    run.metrics.write({"step": step, **results})
    return results


def training_batches(run: Run, state: TrainState) -> Iterator[dict[str, Any]]:
    """Endless micro-batches of pairs from the sampler's position in `state`."""
    loop, accelerator = run.config.loop, run.accelerator
    sampler = StepBatchSampler(len(run.train_set), loop.batch_size, loop.seed, accelerator.process_index,
                               accelerator.num_processes, start=state.micro_batches)  # fmt: skip
    loader = DataLoader(run.train_set, batch_sampler=sampler, num_workers=loop.num_workers,
                        collate_fn=partial(collate_pairs, pad_token_id=run.tokenizer.pad_token_id))  # fmt: skip
    return iter(loader)


def run_mpo(config: MPOConfig) -> RunResult:
    return run_recipe(config, setup, train, partial(save, recipe="MPO"))


def main(argv: list[str] | None = None) -> int:
    return recipe_main("ivl.finetune.mpo", MPOConfig, run_mpo, argv)


if __name__ == "__main__":
    sys.exit(main())
