"""The pieces the fine-tuning recipes (SFT, MPO) share: their common config sections, the data check before
training, gradient checkpointing, optimizer groups, mid-run evaluation and the final export. Recipes import these;
nothing here imports a recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from ivl.data.chat import SampleError
from ivl.data.checks import check_data
from ivl.data.samples import SampleBuilder, SFTDataset, load_records
from ivl.evaluate import evaluate_loss, exact_match
from ivl.model.adapters import (
    is_peft,
    parameter_groups,
    save_trained,
)
from ivl.model.checkpoint import export_final
from ivl.model.parts import model_parts, unwrap
from ivl.model.processor import save_processor
from ivl.model.sharded import full_state_dict, is_sharded
from ivl.options import TrainConfig
from ivl.runtime import checkpoint_activations, plot_curves


def checked_dataset(path: str, builder: SampleBuilder, accelerator: Accelerator, seed: int) -> SFTDataset:
    """Check every row before training: bad rows fail the run now, with the report, or (data.on_error=skip) are
    left out; `dataset.num_left_out` counts them, `dataset.text_only_rows` the kept rows without an image."""
    report = check_data(path, builder, progress=accelerator.is_main_process and sys.stderr.isatty())
    if not report.clean and builder.data.on_error == "fail":
        raise SampleError(f"the data check failed; fix these rows or set data.on_error=skip\n{report.format()}")
    records = load_records(path, seed, builder.data.image_root)
    if not report.clean:
        # Dropped here rather than at batch time, so no process ever gets an empty micro-batch (DDP needs every
        # process to run the forward pass); the collator still skips rows that fail later (e.g. a file removed).
        bad = {location for location, _ in report.bad_rows}
        records = [record for record in records if record.location not in bad]
        accelerator.print(f"data.on_error=skip: {len(bad)} bad rows of {path} are left out")
    dataset = SFTDataset(records, builder)
    dataset.num_left_out = len(report.bad_rows)
    dataset.text_only_rows = report.tiles[0]  # rows without an image or video (DDP: see find_unused_parameters_needed)
    return dataset


def enable_gradient_checkpointing(model: nn.Module, config: TrainConfig) -> None:
    parts = model_parts(model)
    for part, module in ((config.vision, parts.vision), (config.llm, parts.llm)):
        if part.gradient_checkpointing:
            checkpoint_activations(module, part.checkpoint_every)


def optimizer_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    part_lrs = {"vision": config.vision.lr, "projector": config.projector.lr, "llm": config.llm.lr}
    return parameter_groups(model, config.optim.lr, config.optim.weight_decay, part_lrs, config.vision.lr_layer_decay)


def evaluate(run: Any, step: int) -> dict[str, float]:
    """Validation loss (and exact-match) of `run.model` on `run.validation_set`, written to `run.metrics`."""
    settings, results = run.config.eval, {"step": step}
    if run.validation_set is None:
        return {}
    pad = run.tokenizer.pad_token_id
    loss = evaluate_loss(run.model, run.validation_set, run.accelerator, settings.batch_size, pad, run.dtype)
    results.update(eval_loss=loss["loss"], eval_tokens=loss["tokens"])
    records = settings.exact_match_records(run.validation_set.records)
    if records:
        match = exact_match(run.model, run.builder, records, run.accelerator, settings.batch_size,
                            settings.max_new_tokens, run.dtype)  # fmt: skip
        results["eval_exact_match"] = match["exact_match"]
    run.metrics.write(results)
    return results


def save(run: Any, recipe: str = "SFT") -> Path:
    """The final adapter (PEFT format, `OUTPUT/adapter`) or full model (`OUTPUT/model`), with the tokenizer; `recipe`
    titles the loss plot. The MPO recipe saves through here too."""
    accelerator, output_dir = run.accelerator, Path(run.config.loop.output_dir)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(run.model)
    # FSDP2: the weights are gathered whole on every process first (a collective); else the model's own state dict.
    state_dict = full_state_dict(model, trainable_only=is_peft(model)) if is_sharded(model) else None
    out_dir = output_dir / ("adapter" if is_peft(model) else "model")

    def write(model: nn.Module, directory: Path) -> None:  # weights, then what AutoProcessor loads
        save_trained(model, directory, state_dict=state_dict)
        save_processor(directory, run.config.model, unwrap(model).config, run.info.get("data"))

    if accelerator.is_main_process:
        export_final(out_dir, model, run.tokenizer, run.info, write)
        plot_curves(output_dir / "metrics.jsonl", output_dir / "loss.png", f"{recipe} {run.config.model.name_or_path}")
    accelerator.wait_for_everyone()
    return out_dir
