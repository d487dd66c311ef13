"""Supervised fine-tuning of an InternVL model: LoRA, partial LoRA, QLoRA or full training per part (ViT, projector,
LLM).

    ivl sft configs/sft/internvl3_1b_lora.yaml optim.lr=1e-4 loop.max_steps=500
    ivl sft configs/sft/internvl3_2b_partial_lora.yaml --dry-run      # parameter groups, LRs, memory; no training
    accelerate launch -m ivl.finetune.sft configs/sft/internvl3_1b_lora.yaml        # DDP on several GPUs

setup -> train -> save. The loop below is the whole algorithm: micro-batches of one optimizer step are fetched
together so the loss is normalised by the *global* supervised-token count of the step (all micro-batches, all
processes), which makes the update independent of how the step is split (docs/design/loss_reweighting.md).
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
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader

from ivl.config import ConfigError, to_dict
from ivl.data.loader import StepBatchSampler
from ivl.data.packed_loader import PackedBatches, StreamingSource
from ivl.data.packing import collate_padding_free
from ivl.data.samples import SampleBuilder, SFTDataset, collate
from ivl.evaluate import batch_supervised
from ivl.finetune.options import SFTConfig
from ivl.loop import RunResult, StepResult, TrainingLoop, TrainState, accumulate_and_step, count_steps, run_recipe
from ivl.losses import check_loss_kernel, linear_cross_entropy, supervised_weights, target_weights, to_device
from ivl.model.adapters import (
    apply_trainability,
    format_report,
    trainable_report,
)
from ivl.model.forward import output_layer
from ivl.model.integrity import weights_fingerprint
from ivl.model.load import load_model, resolve_dtype
from ivl.model.moe import load_balancing_loss, router_aux_coefficient, router_logits_caught
from ivl.model.packed_attention import check_packing_support, use_packed_attention
from ivl.model.parts import layer_class_names
from ivl.model.quantize import keep_training_layout
from ivl.recipe import recipe_main
from ivl.runtime import (
    MetricsLog,
    build_optimizer,
    build_scheduler,
    find_unused_parameters_needed,
    make_accelerator,
    set_find_unused_parameters,
    shard_per_layer,
    start_trackers,
)
from ivl.training import checked_dataset, enable_gradient_checkpointing, evaluate, optimizer_groups, save


@dataclass
class Run:
    """Everything `setup` builds for the loop."""

    config: SFTConfig
    accelerator: Accelerator
    model: nn.Module
    tokenizer: Any
    builder: SampleBuilder
    train_set: SFTDataset | StreamingSource
    validation_set: SFTDataset | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    dtype: torch.dtype
    metrics: MetricsLog
    info: dict[str, Any]
    router_losses: list[torch.Tensor] = field(default_factory=list)  # this logging window's (MoE LLM), for the metrics


def setup(config: SFTConfig) -> Run:
    loop = config.loop
    modes = config.modes()
    Path(loop.output_dir).mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(config.model.dtype)
    accelerator = make_accelerator(loop, dtype)
    if accelerator.is_fsdp2 and config.data.validation:
        raise ConfigError(
            "data.validation: evaluation inside an FSDP2 run is not supported (processes would run different numbers "
            "of forward passes over the sharded model); drop it and run `ivl eval CONFIG --adapter OUTPUT/adapter`"
        )
    check_loss_kernel(config.loss.kernel, accelerator.device)
    model, tokenizer = load_model(config.model, accelerator.device, quantize_llm=config.adapter.qlora)
    base_fingerprint = weights_fingerprint([model])  # of the base as loaded, before any adapter or update
    if config.adapter.qlora:
        keep_training_layout(model)  # mid-run evaluation must not repack the 4-bit weights for CPU inference
    enable_gradient_checkpointing(model, config)
    if config.data.packing or config.data.padding_free:
        check_packing_support()
        dense = use_packed_attention(model, config.model.attn_implementation)
        if dense:
            option = "data.packing" if config.data.packing else "data.padding_free"
            accelerator.print(f"warning: {option}: packed rows attend through a dense T x T mask: {dense}")
    model = apply_trainability(model, modes, config.vision, config.adapter)
    accelerator.print(format_report(trainable_report(model, modes)))

    builder = SampleBuilder(tokenizer, model.config, config.data)
    if config.data.streaming:  # rows are checked as they are built (data.on_error): no full pass over the stream
        train_set = StreamingSource(config.data.train, builder)
    else:
        train_set = checked_dataset(config.data.train, builder, accelerator, config.data.seed)
    validation_set = None
    if config.data.validation:
        validation_set = checked_dataset(config.data.validation, builder, accelerator, config.data.seed)
    optimizer = build_optimizer(optimizer_groups(model, config), config.optim)
    # loop.max_steps is set whenever packing (validated): a stream has no length, packs no fixed count.
    total_steps = count_steps(loop, None if config.data.streaming else train_set, accelerator.num_processes)
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    shard_per_layer(accelerator, layer_class_names(model))
    text_only = config.data.streaming or train_set.text_only_rows > 0  # a stream is not read ahead: it may have some
    set_find_unused_parameters(accelerator, find_unused_parameters_needed(model, text_only))
    # The scheduler stays outside `prepare`: Accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    info = {
        "recipe": "sft",
        "base_model": to_dict(config.model),
        "qlora": config.adapter.qlora,
        "adapter_kind": config.adapter.kind,
        "modes": modes,
        "data": {k: v for k, v in to_dict(config.data).items() if k not in ("train", "validation")},
        "base_fingerprint": base_fingerprint,
    }
    metrics = MetricsLog(Path(loop.output_dir) / "metrics.jsonl", accelerator)
    start_trackers(accelerator, "ivl-sft", to_dict(config))
    return Run(config, accelerator, model, tokenizer, builder, train_set, validation_set, optimizer, scheduler,
               total_steps, dtype, metrics, info)  # fmt: skip


def forward_loss(run: Run, batch: dict[str, Any], denominator: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the step loss: its weighted CE sum / the step's global weight sum
    (docs/design/loss_reweighting.md); with a mixture-of-experts LLM that trains, plus its share of the routers'
    load-balancing loss, weighted as the model's own loss weighs it (the unweighted value is kept in `run.router_losses`
    for the metrics)."""
    if batch["input_ids"] is None:  # every row skipped: a zero loss that still touches every trainable weight (DDP)
        return sum(p.sum() for p in run.model.parameters() if p.requires_grad) * 0.0
    with router_logits_caught(run.model, enabled=run.info["modes"]["llm"] != "frozen") as router_logits:
        tokens = batch_supervised(run.model, batch, run.accelerator.device, run.dtype)
    # Weights from the collated (CPU) labels, in the order of the supervised positions: nothing here waits for the GPU.
    # Known before the loss runs, so the loss computes its gradient in the same pass (no recomputed logits).
    weights = supervised_weights(batch["labels"], batch["sample_tokens"], run.config.loss.reduction)
    lm_head, kernel = output_layer(run.model), run.config.loss.kernel
    loss = linear_cross_entropy(lm_head, tokens.hidden, tokens.targets, weights, kernel) / denominator
    if not router_logits:
        return loss
    aux = load_balancing_loss(run.model, router_logits, batch["attention_mask"])
    run.router_losses.append(aux.detach())
    return loss + router_aux_coefficient(run.model) * aux / run.config.loop.grad_accum


def optimizer_step(run: Run, window: list[dict[str, Any]], step: int) -> StepResult:
    """Forward + backward over the step's micro-batches and one optimizer update (step number `step`)."""
    accelerator, reduction = run.accelerator, run.config.loss.reduction
    batches = [b for b in window if b["input_ids"] is not None]
    local_weight = sum(float(target_weights(b["labels"], b["sample_tokens"], reduction).sum()) for b in batches)
    global_weight = accelerator.reduce(to_device(torch.tensor(local_weight), accelerator.device), "sum")
    # DDP averages gradients over processes, so each process divides by global_weight / num_processes.
    denominator = global_weight.clamp(min=1e-12) / accelerator.num_processes
    return accumulate_and_step(run, window, lambda batch: forward_loss(run, batch, denominator), step)


def training_batches(run: Run, state: TrainState) -> Iterator[dict[str, Any]]:
    """Endless micro-batches from where `state` says the run is: packs (the packer's saved state, per process) or
    padded samples (the sampler's position)."""
    loop, accelerator, pad = run.config.loop, run.accelerator, run.tokenizer.pad_token_id
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if run.config.data.packing:
        packing_state = state.recipe.get("packing_state")  # one per process, in process order
        return PackedBatches(run.train_set, run.builder, loop.batch_size, pad, loop.seed, loop.num_workers, rank,
                             world_size, packing_state[rank] if packing_state else None)  # fmt: skip
    sampler = StepBatchSampler(len(run.train_set), loop.batch_size, loop.seed, rank, world_size,
                               start=state.micro_batches)  # fmt: skip
    # Page-locked batches on a GPU: their copies to the device (non-blocking in `model_inputs`) overlap compute.
    loader = DataLoader(run.train_set, batch_sampler=sampler, num_workers=loop.num_workers,
                        collate_fn=partial(collate_padding_free if run.config.data.padding_free else collate,
                                           pad_token_id=pad),
                        pin_memory=accelerator.device.type == "cuda")  # fmt: skip
    return iter(loader)


def train(run: Run) -> dict[str, float]:
    """The training loop; returns the last logged and evaluated metrics."""
    data = run.config.data
    layout = {"adapter_kind": run.config.adapter.kind, "packing": data.packing,
              "train_samples": None if data.streaming else len(run.train_set)}  # fmt: skip
    loop = TrainingLoop(run, "sft", layout, TrainState(skipped_rows=getattr(run.train_set, "num_left_out", 0)))
    batches = loop.start(partial(training_batches, run))
    losses, tokens = [], 0
    for window in loop.steps(batches):
        tokens += sum(int(b["attention_mask"].sum()) for b in window if b["input_ids"] is not None)
        result = optimizer_step(run, window, loop.state.step)
        if result.applied:
            losses.append(result.loss)
        else:  # loop.on_nonfinite=skip
            loop.state.nonfinite_steps += 1
        if loop.log_due():
            values = {"tokens_per_second": loop.per_second(tokens), "skipped_rows": loop.state.skipped_rows}
            if losses:  # none when every step of the window was skipped (loop.on_nonfinite=skip)
                values["loss"] = torch.stack(losses).mean().item()
            if run.router_losses:  # mixture-of-experts LLM: the load-balancing loss (unweighted), mean of the window
                values["router_aux_loss"] = run.accelerator.reduce(torch.stack(run.router_losses).mean(), "mean").item()
                run.router_losses.clear()
            loop.log(values)
            losses, tokens = [], 0
        if loop.eval_due():
            loop.last.update(evaluate(run, loop.state.step))
        if loop.save_due():
            packed = isinstance(batches, PackedBatches)  # each process packs its own samples: keep every one's state
            loop.save({"packing_state": gather_object([batches.state()])} if packed else None)
    loop.last.update(evaluate(run, loop.state.step))
    return loop.last


def run_sft(config: SFTConfig) -> RunResult:
    return run_recipe(config, setup, train, save)


def main(argv: list[str] | None = None) -> int:
    return recipe_main("ivl.finetune.sft", SFTConfig, run_sft, argv)


if __name__ == "__main__":
    sys.exit(main())
