"""Supervised fine-tuning of an InternVL model: LoRA, partial LoRA, QLoRA or full training per part (ViT, projector,
LLM).

    ivl sft configs/sft/internvl3_1b_lora.yaml optim.lr=1e-4 loop.max_steps=500
    ivl sft configs/sft/internvl3_2b_partial_lora.yaml --dry-run      # parameter groups, LRs, memory; no training
    accelerate launch -m finetune.sft configs/sft/internvl3_1b_lora.yaml        # DDP on several GPUs

setup -> train -> save. The loop below is the whole algorithm: micro-batches of one optimizer step are fetched
together so the loss is normalised by the *global* supervised-token count of the step (all micro-batches, all
processes), which makes the update independent of how the step is split (SPEC 5).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from finetune.data.chat import SampleError
from finetune.data.checks import check_data
from finetune.data.loader import StepBatchSampler
from finetune.data.samples import DataConfig, SampleBuilder, SFTDataset, collate, load_records, model_inputs
from finetune.evaluate import evaluate_loss, exact_match
from finetune.losses import num_supervised_tokens, token_cross_entropy
from ivl.config import ConfigError, load_config, to_dict
from ivl.model.adapters import (
    AdapterConfig,
    PartConfig,
    Stage,
    VisionPartConfig,
    apply_trainability,
    format_report,
    is_peft,
    parameter_groups,
    resolve_modes,
    save_trained,
    trainable_report,
    validate_modes,
)
from ivl.model.checkpoint import (
    check_same_layout,
    export_final,
    load_training_checkpoint,
    read_checkpoint_state,
    resolve_resume,
    save_training_checkpoint,
)
from ivl.model.load import ModelConfig, load_model, resolve_dtype
from ivl.model.parts import layer_class_names, model_parts
from ivl.model.quantize import keep_training_layout
from ivl.model.sharded import full_state_dict, is_sharded
from ivl.runtime import (
    LoopConfig,
    MetricsLog,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    make_accelerator,
    plot_curves,
    progress_bar,
    shard_per_layer,
    start_trackers,
)


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: Stage = "none"  # stage1 | stage1.5 | stage2 | stage2-lora presets of the part modes (SPEC 8)
    vision: VisionPartConfig = field(default_factory=VisionPartConfig)
    projector: PartConfig = field(default_factory=PartConfig)
    llm: PartConfig = field(default_factory=PartConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        if not self.data.train:
            raise ConfigError("data.train: give the training data (InternVL jsonl, meta .json or HF dataset)")
        if self.data.streaming:
            raise ConfigError("data.streaming: SFT reads map-style data (resumable order); drop data.streaming")
        # Stage / mode conflicts and adapter constraints are config errors, reported before anything loads.
        validate_modes(self.modes(), self.adapter, self.vision)

    def modes(self) -> dict[str, str]:
        return resolve_modes(self.stage, self.vision, self.projector, self.llm)


@dataclass
class Run:
    """Everything `setup` builds for the loop."""

    config: SFTConfig
    accelerator: Accelerator
    model: nn.Module
    tokenizer: Any
    builder: SampleBuilder
    train_set: SFTDataset
    validation_set: SFTDataset | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    dtype: torch.dtype
    metrics: MetricsLog
    info: dict[str, Any]


def _checked_dataset(path: str, builder: SampleBuilder, accelerator: Accelerator, seed: int) -> SFTDataset:
    """Check every row before training: bad rows fail the run now, with the report, or (data.on_error=skip) are
    left out; `dataset.num_left_out` counts them."""
    report = check_data(path, builder, progress=accelerator.is_main_process and sys.stderr.isatty())
    if not report.clean and builder.data.on_error == "fail":
        raise SampleError(f"the data check failed; fix these rows or set data.on_error=skip\n{report.format()}")
    records = load_records(path, seed)
    if not report.clean:
        # Dropped here rather than at batch time, so no process ever gets an empty micro-batch (DDP needs every
        # process to run the forward pass); the collator still skips rows that fail later (e.g. a file removed).
        bad = {location for location, _ in report.bad_rows}
        records = [record for record in records if record.location not in bad]
        accelerator.print(f"data.on_error=skip: {len(bad)} bad rows of {path} are left out")
    dataset = SFTDataset(records, builder)
    dataset.num_left_out = len(report.bad_rows)
    return dataset


def enable_gradient_checkpointing(model: nn.Module, config: SFTConfig) -> None:
    parts = model_parts(model)
    for enabled, module in (
        (config.vision.gradient_checkpointing, parts.vision),
        (config.llm.gradient_checkpointing, parts.llm),
    ):
        if enabled:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def optimizer_groups(model: nn.Module, config: SFTConfig) -> list[dict]:
    part_lrs = {"vision": config.vision.lr, "projector": config.projector.lr, "llm": config.llm.lr}
    return parameter_groups(model, config.optim.lr, config.optim.weight_decay, part_lrs, config.vision.lr_layer_decay)


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
    model, tokenizer = load_model(config.model, accelerator.device, quantize_llm=config.adapter.qlora)
    if config.adapter.qlora:
        keep_training_layout(model)  # mid-run evaluation must not repack the 4-bit weights for CPU inference
    enable_gradient_checkpointing(model, config)
    model = apply_trainability(model, modes, config.vision, config.adapter)
    accelerator.print(format_report(trainable_report(model, modes)))

    builder = SampleBuilder(tokenizer, model.config, config.data)
    train_set = _checked_dataset(config.data.train, builder, accelerator, config.data.seed)
    validation_set = None
    if config.data.validation:
        validation_set = _checked_dataset(config.data.validation, builder, accelerator, config.data.seed)
    optimizer = build_optimizer(optimizer_groups(model, config), config.optim)
    batches_per_epoch = len(train_set) // (loop.batch_size * accelerator.num_processes)
    total_steps = loop.max_steps or max(1, math.ceil(loop.epochs * batches_per_epoch / loop.grad_accum))
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    shard_per_layer(accelerator, layer_class_names(model))
    # The scheduler stays outside `prepare`: Accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    info = {
        "recipe": "sft",
        "base_model": to_dict(config.model),
        "qlora": config.adapter.qlora,
        "adapter_kind": config.adapter.kind,
        "modes": modes,
        "data": {k: v for k, v in to_dict(config.data).items() if k not in ("train", "validation")},
    }
    metrics = MetricsLog(Path(loop.output_dir) / "metrics.jsonl", accelerator)
    start_trackers(accelerator, "ivl-sft", to_dict(config))
    return Run(config, accelerator, model, tokenizer, builder, train_set, validation_set, optimizer, scheduler,
               total_steps, dtype, metrics, info)  # fmt: skip


def forward_loss(run: Run, batch: dict[str, Any], denominator: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the step loss: its token CE sum / the step's global token count."""
    if batch["input_ids"] is None:  # every row skipped: a zero loss that still touches every trainable weight (DDP)
        return sum(p.sum() for p in run.model.parameters() if p.requires_grad) * 0.0
    inputs = model_inputs(batch, run.accelerator.device, run.dtype)
    labels = inputs.pop("labels")
    logits = run.model(**inputs).logits
    return token_cross_entropy(logits, labels, denominator)


def optimizer_step(run: Run, window: list[dict[str, Any]]) -> torch.Tensor:
    """Forward + backward over the step's micro-batches and one optimizer update; returns the step's loss."""
    accelerator, model = run.accelerator, run.model
    local_tokens = sum(num_supervised_tokens(b["labels"]) for b in window if b["input_ids"] is not None)
    global_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=accelerator.device), "sum")
    # DDP averages gradients over processes, so each process divides by global_tokens / num_processes.
    denominator = global_tokens.clamp(min=1) / accelerator.num_processes
    step_loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(window):
        last = index == len(window) - 1
        with nullcontext() if last else accelerator.no_sync(model):  # gradients all-reduce on the last one only
            with accelerator.autocast():
                loss = forward_loss(run, batch, denominator)
            accelerator.backward(loss)
        step_loss += loss.detach()
    if run.config.optim.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), run.config.optim.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, "sum") / accelerator.num_processes


def evaluate(run: Run, step: int) -> dict[str, float]:
    loop, results = run.config.loop, {"step": step}
    if run.validation_set is None:
        return {}
    pad = run.tokenizer.pad_token_id
    loss = evaluate_loss(run.model, run.validation_set, run.accelerator, loop.eval_batch_size, pad, run.dtype)
    results.update(eval_loss=loss["loss"], eval_tokens=loss["tokens"])
    if loop.exact_match_samples:
        records = run.validation_set.records[: loop.exact_match_samples]
        match = exact_match(run.model, run.builder, records, run.accelerator, loop.eval_batch_size,
                            loop.max_new_tokens, run.dtype)  # fmt: skip
        results["eval_exact_match"] = match["exact_match"]
    run.metrics.write(results)
    return results


def train(run: Run) -> dict[str, Any]:
    """The training loop; returns the last logged and evaluated metrics."""
    loop, accelerator = run.config.loop, run.accelerator
    layout = {"num_processes": accelerator.num_processes, "batch_size": loop.batch_size, "grad_accum": loop.grad_accum,
              "seed": loop.seed, "train_samples": len(run.train_set),
              "adapter_kind": run.config.adapter.kind}  # fmt: skip
    state = {"step": 0, "micro_batches": 0, "skipped_rows": run.train_set.num_left_out}
    resume_from = resolve_resume(loop.resume, loop.output_dir)
    if resume_from is not None:
        state.update(read_checkpoint_state(resume_from))
        check_same_layout(resume_from, state, layout)
    sampler = StepBatchSampler(len(run.train_set), loop.batch_size, loop.seed, accelerator.process_index,
                               accelerator.num_processes, start=state["micro_batches"])  # fmt: skip
    loader = DataLoader(run.train_set, batch_sampler=sampler, num_workers=loop.num_workers,
                        collate_fn=partial(collate, pad_token_id=run.tokenizer.pad_token_id))  # fmt: skip
    batches = iter(loader)  # draws the workers' base seed from the global RNG: before restoring the saved RNG state
    if resume_from is not None:
        load_training_checkpoint(resume_from, accelerator, run.model, run.optimizer, run.scheduler)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    run.metrics.truncate_after(state["step"])
    progress = progress_bar(accelerator, run.total_steps, state["step"], "sft")
    losses, tokens, clock, last = [], 0, time.perf_counter(), {}
    run.model.train()
    while state["step"] < run.total_steps:
        window = [next(batches) for _ in range(loop.grad_accum)]
        state["micro_batches"] += len(window)
        state["skipped_rows"] += sum(batch["num_skipped"] for batch in window)
        tokens += sum(int(b["attention_mask"].sum()) for b in window if b["input_ids"] is not None)
        losses.append(optimizer_step(run, window))
        state["step"] += 1
        step = state["step"]
        saving = bool(loop.save_every) and step % loop.save_every == 0
        # A checkpoint closes the logging window too, so a resumed run logs the same windows as an uninterrupted one.
        if step % loop.log_every == 0 or step == run.total_steps or saving:
            seconds = time.perf_counter() - clock
            last = {
                "step": step,
                "loss": torch.stack(losses).mean().item(),
                "lr": run.scheduler.get_last_lr()[0],
                "tokens_per_second": tokens * accelerator.num_processes / seconds,
                "skipped_rows": state["skipped_rows"],
            }
            run.metrics.write(last)
            progress.set_postfix(
                loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_second']:.0f}"
            )
            losses, tokens, clock = [], 0, time.perf_counter()
        if loop.eval_every and step % loop.eval_every == 0 and step < run.total_steps:
            last.update(evaluate(run, step))
        if saving:
            save_training_checkpoint(loop.output_dir, step, accelerator, run.model, run.optimizer, run.scheduler,
                                     {**layout, **{k: v for k, v in state.items() if k != "step"}},
                                     loop.keep_last)  # fmt: skip
        progress.update(1)
    progress.close()
    last.update(evaluate(run, state["step"]))
    return last


def save(run: Run) -> Path:
    """The final adapter (PEFT format, `OUTPUT/adapter`) or full model (`OUTPUT/model`), with the tokenizer."""
    accelerator, output_dir = run.accelerator, Path(run.config.loop.output_dir)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(run.model)
    # FSDP2: the weights are gathered whole on every process first (a collective); else the model's own state dict.
    state_dict = full_state_dict(model, trainable_only=is_peft(model)) if is_sharded(model) else None
    out_dir = output_dir / ("adapter" if is_peft(model) else "model")
    if accelerator.is_main_process:
        export_final(out_dir, model, run.tokenizer, run.info, partial(save_trained, state_dict=state_dict))
        plot_curves(output_dir / "metrics.jsonl", output_dir / "loss.png", f"SFT {run.config.model.name_or_path}")
    accelerator.wait_for_everyone()
    return out_dir


def run_sft(config: SFTConfig) -> dict[str, Any]:
    run = setup(config)
    metrics = train(run)
    out_dir = save(run)
    run.accelerator.end_training()
    return {"output": str(out_dir), "is_main_process": run.accelerator.is_main_process, **metrics}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m finetune.sft CONFIG.yaml [section.key=value ...]", file=sys.stderr)
        return 2
    from ivl.cli import KNOWN_ERRORS

    try:
        config = load_config(SFTConfig, argv[0], argv[1:])
        result = run_sft(config)
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result["is_main_process"]:
        print(f"done: {result['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
