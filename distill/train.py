"""Vision-encoder distillation (docs/design/distillation.md): an InternViT-300M-shaped student learns an InternViT
teacher's hidden states.

    ivl distill configs/distill/internvit_6b_to_300m.yaml                 online: the teacher runs every step
    ivl distill cache configs/distill/internvit_6b_to_300m.yaml           offline, 1: write the teacher's features
    ivl distill configs/distill/internvit_6b_to_300m.yaml mode=offline    offline, 2: train with no teacher in memory
    accelerate launch -m ivl.distill.train configs/distill/internvit_6b_to_300m.yaml   DDP on several GPUs

setup -> train -> save, on the loop skeleton every recipe shares (ivl.loop): micro-batches of one optimizer step are
fetched together, every micro-batch is full (the sampler drops partial ones), so dividing each one's summed per-tile
loss by batch_size * grad_accum makes the step's update that of the mean over its global batch, however it is split.
The student's adapted hidden states of the supervised layers are compared with the teacher's (ivl.distill.losses); the
adaptors are trained with the student and left out of the exported student.
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
from ivl.distill.cache import CachedTargets, CachedTiles
from ivl.distill.data import TileDataset, collate, list_images
from ivl.distill.evaluate import heldout_cosine
from ivl.distill.export import save_run
from ivl.distill.losses import distill_loss
from ivl.distill.models import image_size_of
from ivl.distill.options import (
    DistillConfig,
    DistillDataConfig,
)
from ivl.distill.student import StudentWithAdaptors, build_student
from ivl.distill.teacher import TeacherTargets, load_teacher
from ivl.image import normalize
from ivl.loop import RunResult, StepResult, TrainingLoop, TrainState, accumulate_and_step, count_steps, run_recipe
from ivl.model.integrity import weights_fingerprint
from ivl.model.load import resolve_dtype
from ivl.recipe import recipe_main
from ivl.runtime import (
    MetricsLog,
    build_optimizer,
    build_scheduler,
    checkpoint_activations,
    make_accelerator,
    start_trackers,
)


@dataclass
class Run:
    """Everything `setup` builds for the loop."""

    config: DistillConfig
    accelerator: Accelerator
    model: nn.Module  # StudentWithAdaptors, prepared (DDP-wrapped when distributed)
    targets: Any  # TeacherTargets | CachedTargets: (batch, pixel_values) -> (targets per pair, token_index)
    validation_targets: Any
    train_set: TileDataset | CachedTiles
    validation_set: TileDataset | CachedTiles | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    metrics: MetricsLog
    info: dict[str, Any]


@dataclass
class TeacherSide:
    """What the recipe needs from the teacher, online or offline."""

    num_layers: int
    width: int
    image_size: int
    make_targets: Any  # (layers, dataset) -> TeacherTargets | CachedTargets
    train_set: TileDataset | CachedTiles
    validation_set: TileDataset | CachedTiles | None
    teacher: nn.Module | None  # online only


def tile_datasets(data: DistillDataConfig, tile_size: int) -> tuple[TileDataset, TileDataset | None]:
    """The training and (if any) held-out tiles, in their fixed order."""
    train_set = TileDataset(list_images(data.train, data.max_images), tile_size, data)
    if not data.validation:
        return train_set, None
    return train_set, TileDataset(list_images(data.validation, data.validation_images), tile_size, data)


def teacher_side(config: DistillConfig, device: torch.device, tile_size: int) -> TeacherSide:
    if config.mode == "offline":
        root = Path(config.cache.dir)
        # A cache without stored tiles cuts them again from the same images (checked against its data hash).
        tiles = (None, None) if config.cache.store_pixels else tile_datasets(config.data, tile_size)
        train_set = CachedTiles(root / "train", tiles[0])
        validation_set = CachedTiles(root / "validation", tiles[1]) if config.data.validation else None
        manifest = train_set.manifest
        return TeacherSide(manifest["teacher_num_layers"], manifest["teacher_width"], manifest["image_size"],
                           lambda layers, dataset: CachedTargets(dataset.pca, layers, device),
                           train_set, validation_set, None)  # fmt: skip
    teacher = load_teacher(config.teacher, device)
    train_set, validation_set = tile_datasets(config.data, tile_size)
    return TeacherSide(teacher.config.num_hidden_layers, teacher.config.hidden_size, image_size_of(teacher.config),
                       lambda layers, dataset: TeacherTargets(teacher, layers), train_set, validation_set,
                       teacher)  # fmt: skip


def check_cache(config: DistillConfig, side: TeacherSide, teacher_layers: list[int]) -> None:
    for dataset in (side.train_set, side.validation_set):
        if isinstance(dataset, CachedTiles):
            missing = sorted(set(teacher_layers) - set(dataset.manifest["layers"]))
            if missing:
                raise ConfigError(f"{dataset.root} caches teacher layers {dataset.manifest['layers']}, not {missing}: "
                                  "re-run ivl distill cache with these loss.pairs / loss.last_k")  # fmt: skip
            if dataset.manifest["teacher"] != config.teacher.name_or_path:
                raise ConfigError(f"{dataset.root} was written by teacher {dataset.manifest['teacher']}, "
                                  f"not {config.teacher.name_or_path}")  # fmt: skip


def setup(config: DistillConfig) -> Run:
    loop = config.loop
    Path(loop.output_dir).mkdir(parents=True, exist_ok=True)
    # The student keeps fp32 weights; `auto` gives bf16 autocast where the teacher computes in bf16 (a bf16 GPU).
    compute_dtype = resolve_dtype(config.teacher.dtype) if loop.mixed_precision == "auto" else torch.float32
    accelerator = make_accelerator(loop, compute_dtype)
    vision = config.student.vision_config()
    side = teacher_side(config, accelerator.device, image_size_of(vision))
    if side.image_size != image_size_of(vision):
        raise ConfigError(f"student.image_size {image_size_of(vision)} != the teacher's {side.image_size}: both "
                          "must see the same tiles")  # fmt: skip
    pairs = config.loss.layer_pairs(vision.num_hidden_layers, side.num_layers)
    student_layers, teacher_layers = [s for s, _ in pairs], [t for _, t in pairs]
    check_cache(config, side, teacher_layers)
    calibration = None
    if config.student.init == "clip":
        count = min(config.student.calibration_tiles, len(side.train_set))
        calibration = torch.stack([side.train_set[i]["pixels"] for i in range(count)])
    student, init_report = build_student(config.student, calibration)
    # What a resume must find unchanged besides the config: the student's starting weights and the online teacher.
    base_fingerprint = weights_fingerprint([student] + ([side.teacher] if side.teacher is not None else []))
    if config.student.gradient_checkpointing:
        checkpoint_activations(student)
    if "cosine_to_clip" in init_report:
        cosine, pre_layernorm = init_report["cosine_to_clip"], config.student.pre_layernorm
        accelerator.print(f"student initialised from {config.student.clip}: cosine to CLIP {cosine:.4f} "
                          f"(pre-LayerNorm: {pre_layernorm})")  # fmt: skip
    model = StudentWithAdaptors(student, student_layers, side.width, seed=config.student.init_seed + 1)
    model.to(accelerator.device)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms, biases, scales, tokens do not
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = build_optimizer([{**g, "lr": config.optim.lr} for g in groups], config.optim)
    total_steps = count_steps(loop, side.train_set, accelerator.num_processes)
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    # The scheduler stays outside `prepare`: Accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    info = {"recipe": "distill", "mode": config.mode, "teacher": to_dict(config.teacher), "layer_pairs": pairs,
            "student_preset": config.student.preset, "init": init_report, "loss": to_dict(config.loss),
            "base_fingerprint": base_fingerprint}  # fmt: skip
    metrics = MetricsLog(Path(loop.output_dir) / "metrics.jsonl", accelerator)
    start_trackers(accelerator, "ivl-distill", to_dict(config))
    validation_targets = side.make_targets(teacher_layers, side.validation_set) if side.validation_set else None
    return Run(config, accelerator, model, side.make_targets(teacher_layers, side.train_set), validation_targets,
               side.train_set, side.validation_set, optimizer, scheduler, total_steps, metrics, info)  # fmt: skip


def forward_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """This micro-batch's share of the step loss: its summed per-tile loss / the tiles per process and step."""
    loop = run.config.loop
    pixels = normalize(batch["pixels"].to(run.accelerator.device))  # uint8 [B, 3, S, S] -> ImageNet-normalised
    targets, token_index = run.targets(batch, pixels)  # the teacher runs outside autocast, in its own dtype
    with run.accelerator.autocast():
        states = run.model(pixels)  # per pair: [B, 1 + T, teacher width]
    per_tile = distill_loss(states, targets, token_index, run.config.loss)  # [B]
    return per_tile.sum() / (loop.batch_size * loop.grad_accum)


def optimizer_step(run: Run, window: list[dict[str, Any]], step: int) -> StepResult:
    """Forward + backward over the step's micro-batches and one optimizer update (step number `step`). No autocast
    around the forward: the teacher runs in its own dtype, `forward_loss` autocasts the student only."""

    def sources(window: list[dict[str, Any]]) -> list[str]:
        return [run.train_set.source(int(index)) for batch in window for index in batch["index"]]

    return accumulate_and_step(run, window, partial(forward_loss, run), step, autocast=False, sources=sources)


def evaluate(run: Run, step: int) -> dict[str, float]:
    if run.validation_set is None:
        return {}
    results = {"step": step, **heldout_cosine(run.model, run.validation_set, run.validation_targets, run.config.loss,
                                              run.accelerator, run.config.eval.batch_size)}  # fmt: skip
    run.metrics.write(results)
    return results


def training_batches(run: Run, state: TrainState) -> Iterator[dict[str, Any]]:
    """Endless micro-batches of tiles from the sampler's position in `state`."""
    loop, accelerator = run.config.loop, run.accelerator
    sampler = StepBatchSampler(len(run.train_set), loop.batch_size, loop.seed, accelerator.process_index,
                               accelerator.num_processes, start=state.micro_batches)  # fmt: skip
    return iter(DataLoader(run.train_set, batch_sampler=sampler, num_workers=loop.num_workers, collate_fn=collate))


def train(run: Run) -> dict[str, float]:
    """The training loop; returns the last logged and evaluated metrics."""
    loop = TrainingLoop(run, "distill", {"train_tiles": len(run.train_set), "mode": run.config.mode})
    batches = loop.start(partial(training_batches, run))
    if loop.state.step == 0:
        loop.last = evaluate(run, 0)  # the starting point of the held-out cosine
    losses, tiles = [], 0
    for window in loop.steps(batches):
        tiles += sum(len(batch["pixels"]) for batch in window)
        result = optimizer_step(run, window, loop.state.step)
        if result.applied:
            losses.append(result.loss)
        else:  # loop.on_nonfinite=skip
            loop.state.nonfinite_steps += 1
        if loop.log_due():
            mean = {"loss": torch.stack(losses).mean().item()} if losses else {}  # none if all were skipped
            loop.log({**mean, "tiles_per_second": loop.per_second(tiles)})
            losses, tiles = [], 0
        if loop.eval_due():
            loop.last.update(evaluate(run, loop.state.step))
        if loop.save_due():
            loop.save()
    loop.last.update(evaluate(run, loop.state.step))
    return loop.last


def save(run: Run) -> Path:
    """OUTPUT/student (HF-native InternVLVisionModel, no adaptors), OUTPUT/adaptors.safetensors, loss.png."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    out_dir = Path(run.config.loop.output_dir)
    if accelerator.is_main_process:
        save_run(out_dir, accelerator.unwrap_model(run.model), run.info, f"distill {run.config.student.preset}")
    accelerator.wait_for_everyone()
    return out_dir / "student"


def run_distill(config: DistillConfig) -> RunResult:
    return run_recipe(config, setup, train, save)


def main(argv: list[str] | None = None) -> int:
    return recipe_main("ivl.distill.train", DistillConfig, run_distill, argv)


if __name__ == "__main__":
    sys.exit(main())
