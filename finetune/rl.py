"""Online RL with verifiable rewards (GSPO / GRPO) of an InternVL model: LoRA, partial LoRA or QLoRA.

    ivl rl configs/rl/tiny.yaml loop.max_steps=20
    ivl rl configs/rl/internvl3_5_8b_qlora_gspo.yaml loss.level=token         # GRPO instead of GSPO
    accelerate launch -m ivl.finetune.rl configs/rl/internvl3_5_8b_qlora_gspo.yaml

setup -> train -> save, with SFT's conventions (metrics.jsonl, atomic checkpoints, resume, final adapter). Each
generation batch takes loop.batch_size x loop.grad_accum prompts per process, samples rl.num_generations answers to
each with the current policy (`ivl.finetune.rollout`), scores them (`ivl.finetune.rewards`), normalises the rewards
within each prompt's group to advantages, and makes rl.updates_per_batch optimizer steps on it with the clipped loss
of `ivl.rl_losses` (loss.level sequence: GSPO, token: GRPO). The reference policy of the KL term is the same model
with its adapters disabled. Written as the kit's own loop rather than on TRL's GRPOTrainer: that trainer owns the
model loading, the processor's tiling and the loss path, where the kit needs its own (InternVL tiling and templates,
partial LoRA, 4-bit bases, the memory-lean log-probs); tests check the loss against TRL's on the same tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ivl.config import ConfigError, to_dict
from ivl.data.loader import StepBatchSampler
from ivl.data.samples import SampleBuilder
from ivl.finetune.options import RLConfig
from ivl.finetune.rewards import WeightedReward, build_reward
from ivl.finetune.rollout import (
    PromptDataset,
    answer_logps,
    collate_rl_prompts,
    evaluate_rewards,
    reused_rollouts,
)
from ivl.loop import RunResult, TrainingLoop, TrainState, accumulate_and_step, count_steps, run_recipe
from ivl.model.adapters import apply_trainability, format_report, is_peft, trainable_report
from ivl.model.integrity import weights_fingerprint
from ivl.model.load import load_model, resolve_dtype
from ivl.model.quantize import keep_training_layout
from ivl.recipe import recipe_main
from ivl.rl_losses import clipped_policy_loss
from ivl.runtime import MetricsLog, build_optimizer, build_scheduler, make_accelerator, read_metrics, start_trackers
from ivl.training import checked_dataset, enable_gradient_checkpointing, optimizer_groups, save

METRICS = ("loss", "reward", "clipped", "kl", "answer_tokens")


@dataclass
class Run:
    """Everything `setup` builds for the loop."""

    config: RLConfig
    accelerator: Accelerator
    model: nn.Module
    tokenizer: Any
    builder: SampleBuilder
    reward: WeightedReward
    train_set: PromptDataset
    validation_set: PromptDataset | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    dtype: torch.dtype
    metrics: MetricsLog
    info: dict[str, Any]


def setup(config: RLConfig) -> Run:
    loop, modes = config.loop, config.modes()
    Path(loop.output_dir).mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(config.model.dtype)
    accelerator = make_accelerator(loop, dtype)
    if accelerator.is_fsdp2:
        raise ConfigError("RL runs on one process or under DDP (configs/accelerate/ddp.yaml); FSDP2 is SFT-only")
    reward = build_reward(config.rewards.weights, config.rewards.numeric_tolerance)
    model, tokenizer = load_model(config.model, accelerator.device, quantize_llm=config.adapter.qlora)
    base_fingerprint = weights_fingerprint([model])  # of the base as loaded, before any adapter or update
    if config.adapter.qlora:
        keep_training_layout(model)
    enable_gradient_checkpointing(model, config)
    model = apply_trainability(model, modes, config.vision, config.adapter)
    if config.loss.beta > 0 and not is_peft(model):
        raise ConfigError("loss.beta > 0: the reference is the model with its adapters disabled; train with adapters "
                          "(LoRA / QLoRA / partial LoRA) or set loss.beta=0")  # fmt: skip
    accelerator.print(format_report(trainable_report(model, modes)))
    builder = SampleBuilder(tokenizer, model.config, config.data)
    thinking = config.rl.thinking
    train_set = PromptDataset(checked_dataset(config.data.train, builder, accelerator, config.data.seed).records,
                              builder, thinking)  # fmt: skip
    validation_set = None
    if config.data.validation:
        checked = checked_dataset(config.data.validation, builder, accelerator, config.data.seed)
        validation_set = PromptDataset(checked.records, builder, thinking)
    optimizer = build_optimizer(optimizer_groups(model, config), config.optim)
    # loop.epochs counts generation batches over the prompts; each gives rl.updates_per_batch optimizer steps.
    generation_batches = count_steps(loop, train_set, accelerator.num_processes)
    total_steps = loop.max_steps or generation_batches * config.rl.updates_per_batch
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    info = {"recipe": "rl", "base_model": to_dict(config.model), "qlora": config.adapter.qlora,
            "adapter_kind": config.adapter.kind, "modes": modes, "rl": to_dict(config.rl),
            "loss": to_dict(config.loss), "rewards": to_dict(config.rewards),
            "base_fingerprint": base_fingerprint}  # fmt: skip
    metrics = MetricsLog(Path(loop.output_dir) / "metrics.jsonl", accelerator)
    start_trackers(accelerator, "ivl-rl", to_dict(config))
    return Run(config, accelerator, model, tokenizer, builder, reward, train_set, validation_set, optimizer, scheduler,
               total_steps, dtype, metrics, info)  # fmt: skip


def forward_loss(run: Run, rollout: dict[str, Any], sums: torch.Tensor) -> torch.Tensor:
    """This rollout's share of the step loss (its answers' losses / the step's answers per process); adds
    [METRICS] x answers to `sums`."""
    options, device = run.config.loss, run.accelerator.device
    logps = answer_logps(run.model, rollout, device, run.dtype)  # [B*G, L], with gradients
    old = rollout.get("old_logps", logps.detach())  # one update per batch: pi_old = pi, ratios 1
    eps_low, eps_high = options.clip_range()
    result = clipped_policy_loss(logps, old, rollout["advantages"], rollout["answer_mask"], level=options.level,
                                 eps_low=eps_low, eps_high=eps_high, beta=options.beta,
                                 ref_logps=rollout.get("ref_logps"))  # fmt: skip
    config = run.config
    answers_per_step = config.loop.grad_accum * config.loop.batch_size * config.rl.num_generations
    loss = result.per_answer.sum() / answers_per_step
    kl = result.kl.sum() if result.kl is not None else torch.zeros((), device=device)
    sums += torch.stack([result.per_answer.detach().sum(), rollout["rewards"].sum().to(device), result.clipped.sum(),
                         kl, rollout["answer_mask"].sum()]).float()  # fmt: skip
    return loss


def train(run: Run) -> dict[str, float]:
    """The training loop; returns the last logged and evaluated metrics."""
    config = run.config
    layout = {"train_samples": len(run.train_set), "recipe": "rl", "num_generations": config.rl.num_generations,
              "updates_per_batch": config.rl.updates_per_batch}  # fmt: skip
    loop = TrainingLoop(run, "rl", layout, TrainState())
    rollouts = loop.start(partial(training_rollouts, run))
    start = starting_evaluation(run, loop.state.step)
    window_sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=run.accelerator.device)
    for window in loop.steps(rollouts):
        sums = torch.zeros(len(METRICS), device=run.accelerator.device)
        if accumulate_and_step(run, window, partial(forward_loss, run, sums=sums), loop.state.step).applied:
            groups = sum(r["groups"] for r in window)
            zero = sum(r["zero_variance_groups"] for r in window)
            window_sums += torch.cat([sums.double(), torch.tensor([zero, groups], device=sums.device)])
        else:  # loop.on_nonfinite=skip: the step is left out of the metrics too
            loop.state.nonfinite_steps += 1
        if loop.log_due():
            loop.log(window_metrics(run, window_sums), show=("loss", "reward"))
            window_sums.zero_()
        if loop.eval_due():
            loop.last.update(evaluate(run, loop.state.step))
        if loop.save_due():
            loop.save()
    loop.last.update(evaluate(run, loop.state.step))
    loop.last.update(changes_since_start(start, loop.last))
    return loop.last


def window_metrics(run: Run, sums: torch.Tensor) -> dict[str, float]:
    """The logging window's sums over all processes -> per-answer means, and the share of zero-variance groups."""
    sums = run.accelerator.reduce(sums, "sum")
    answers = sums[-1] * run.config.rl.num_generations
    values = {name: (sums[i] / answers.clamp(min=1)).item() for i, name in enumerate(METRICS)}
    values["zero_variance_groups"] = (sums[-2] / sums[-1].clamp(min=1)).item()
    return values


def evaluate(run: Run, step: int) -> dict[str, float]:
    """Held-out reward and exact-match of greedy answers, written to the metrics."""
    if run.validation_set is None:
        return {}
    settings = run.config.eval
    results = evaluate_rewards(run.model, run.builder, run.validation_set, run.reward, run.accelerator,
                               settings.batch_size, settings.max_new_tokens, run.dtype, settings.group_by)  # fmt: skip
    run.metrics.write({"step": step, **results})
    return results


def starting_evaluation(run: Run, step: int) -> dict[str, float]:
    """The held-out metrics before the first update: measured at step 0, or read back from metrics.jsonl when the
    run resumes later."""
    if run.validation_set is None:
        return {}
    if step == 0:
        return evaluate(run, 0)
    records = read_metrics(Path(run.config.loop.output_dir) / "metrics.jsonl")
    return next((r for r in records if r.get("step") == 0 and "eval_reward" in r), {})


def changes_since_start(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    """`eval_reward/position` -> `eval_reward_change/position` = its value now minus at step 0 (each held-out metric
    the run measured at both)."""
    changes = {}
    for key, value in start.items():
        if key.startswith("eval_") and key in end:
            name, _, group = key.partition("/")
            changes[f"{name}_change" + (f"/{group}" if group else "")] = end[key] - value
    return changes


def training_rollouts(run: Run, state: TrainState) -> Iterator[dict[str, Any]]:
    """Endless rollouts from the prompt sampler's position in `state`. The prompt iterator is made here, before the
    loop restores the saved RNG (as in an uninterrupted run); sampling starts at the first `next`, after it."""
    loop, accelerator = run.config.loop, run.accelerator
    generation_batches = state.micro_batches // run.config.rl.updates_per_batch
    sampler = StepBatchSampler(len(run.train_set), loop.batch_size, loop.seed, accelerator.process_index,
                               accelerator.num_processes, start=generation_batches)  # fmt: skip
    loader = DataLoader(run.train_set, batch_sampler=sampler, num_workers=loop.num_workers,
                        collate_fn=partial(collate_rl_prompts, pad_token_id=run.tokenizer.pad_token_id))  # fmt: skip
    return reused_rollouts(run, iter(loader))


def run_rl(config: RLConfig) -> RunResult:
    return run_recipe(config, setup, train, partial(save, recipe="RL"))


def main(argv: list[str] | None = None) -> int:
    return recipe_main("ivl.finetune.rl", RLConfig, run_rl, argv)


if __name__ == "__main__":
    sys.exit(main())
