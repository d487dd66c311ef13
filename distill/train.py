"""Vision-encoder distillation (SPEC 10): an InternViT-300M-shaped student learns an InternViT teacher's hidden states.

    ivl distill configs/distill/internvit_6b_to_300m.yaml                 online: the teacher runs every step
    ivl distill cache configs/distill/internvit_6b_to_300m.yaml           offline, 1: write the teacher's features
    ivl distill configs/distill/internvit_6b_to_300m.yaml mode=offline    offline, 2: train with no teacher in memory
    accelerate launch -m ivl.distill.train configs/distill/internvit_6b_to_300m.yaml   DDP on several GPUs

setup -> train -> save, with SFT's loop conventions (finetune/sft.py): micro-batches of one optimizer step are fetched
together, every micro-batch is full (the sampler drops partial ones), so dividing each one's summed per-tile loss by
batch_size * grad_accum makes the step's update that of the mean over its global batch, however it is split.
The student's adapted hidden states of the supervised layers are compared with the teacher's (ivl.distill.losses); the
adaptors are trained with the student and left out of the exported student.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ivl.config import ConfigError, to_dict
from ivl.data.loader import StepBatchSampler
from ivl.distill.cache import CacheConfig, CachedTargets, CachedTiles
from ivl.distill.data import DistillDataConfig, TileDataset, collate, list_images
from ivl.distill.evaluate import ProbeConfig, heldout_cosine
from ivl.distill.export import save_run
from ivl.distill.losses import LossConfig, distill_loss
from ivl.distill.models import image_size_of
from ivl.distill.student import StudentConfig, StudentWithAdaptors, build_student
from ivl.distill.teacher import TeacherConfig, TeacherTargets, load_teacher
from ivl.image import normalize
from ivl.model.checkpoint import (
    load_training_checkpoint,
    resume_point,
    save_training_checkpoint,
)
from ivl.model.integrity import run_record, weights_fingerprint
from ivl.model.load import resolve_dtype
from ivl.outputs import claim_output_dir
from ivl.recipe import recipe_main
from ivl.runtime import (
    LoopConfig,
    MetricsLog,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    end_training,
    make_accelerator,
    progress_bar,
    start_trackers,
)
from ivl.update import finish_step


@dataclass
class DistillConfig:
    mode: Literal["online", "offline"] = "online"  # offline: teacher features from cache.dir (ivl distill cache)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        if self.mode == "offline" and not self.cache.dir:
            raise ConfigError("mode=offline reads the teacher's features from cache.dir: set it and run "
                              "`ivl distill cache CONFIG` first")  # fmt: skip


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
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    batches_per_epoch = len(side.train_set) // (loop.batch_size * accelerator.num_processes)
    total_steps = loop.max_steps or max(1, math.ceil(loop.epochs * batches_per_epoch / loop.grad_accum))
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


def optimizer_step(run: Run, window: list[dict[str, Any]], step: int) -> torch.Tensor | None:
    """Forward + backward over the step's micro-batches and one optimizer update (step number `step`); returns the
    step's loss, or None when the step was not finite and skipped (loop.on_nonfinite=skip)."""
    accelerator, model = run.accelerator, run.model
    step_loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(window):
        last = index == len(window) - 1
        with nullcontext() if last else accelerator.no_sync(model):  # gradients all-reduce on the last one only
            loss = forward_loss(run, batch)
            accelerator.backward(loss)
        step_loss += loss.detach()
    # DDP averages gradients over processes; the logged loss is averaged the same way.
    step_loss = accelerator.reduce(step_loss, "sum") / accelerator.num_processes
    sources = [run.train_set.source(int(index)) for batch in window for index in batch["index"]]
    applied = finish_step(accelerator, model, run.optimizer, run.scheduler, step_loss, run.config.optim.max_grad_norm,
                          run.config.loop.on_nonfinite, step, sources)  # fmt: skip
    return step_loss if applied else None


def evaluate(run: Run, step: int) -> dict[str, float]:
    if run.validation_set is None:
        return {}
    loop = run.config.loop
    results = {"step": step, **heldout_cosine(run.model, run.validation_set, run.validation_targets, run.config.loss,
                                              run.accelerator, loop.eval_batch_size)}  # fmt: skip
    run.metrics.write(results)
    return results


def train(run: Run) -> dict[str, Any]:
    """The training loop; returns the last logged and evaluated metrics."""
    loop, accelerator = run.config.loop, run.accelerator
    layout = {"num_processes": accelerator.num_processes, "batch_size": loop.batch_size, "grad_accum": loop.grad_accum,
              "seed": loop.seed, "train_tiles": len(run.train_set), "mode": run.config.mode}  # fmt: skip
    state = {"step": 0, "micro_batches": 0, "nonfinite_steps": 0}
    record = run_record(to_dict(run.config), run.info["base_fingerprint"])
    resume_from = resume_point(loop.resume, loop.output_dir, state, layout, record, accelerator.print)
    sampler = StepBatchSampler(len(run.train_set), loop.batch_size, loop.seed, accelerator.process_index,
                               accelerator.num_processes, start=state["micro_batches"])  # fmt: skip
    loader = DataLoader(run.train_set, batch_sampler=sampler, num_workers=loop.num_workers, collate_fn=collate)
    batches = iter(loader)  # draws the workers' base seed from the global RNG: before restoring the saved RNG state
    if resume_from is not None:
        load_training_checkpoint(resume_from, accelerator, run.model, run.optimizer, run.scheduler)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    run.metrics.truncate_after(state["step"])
    last = evaluate(run, 0) if state["step"] == 0 else {}  # the starting point of the held-out cosine
    progress = progress_bar(accelerator, run.total_steps, state["step"], "distill")
    losses, tiles, clock = [], 0, time.perf_counter()
    run.model.train()
    while state["step"] < run.total_steps:
        window = [next(batches) for _ in range(loop.grad_accum)]
        state["micro_batches"] += len(window)
        tiles += sum(len(batch["pixels"]) for batch in window)
        loss = optimizer_step(run, window, state["step"] + 1)
        if loss is None:
            state["nonfinite_steps"] += 1
        else:
            losses.append(loss)
        state["step"] += 1
        step = state["step"]
        saving = bool(loop.save_every) and step % loop.save_every == 0
        # A checkpoint closes the logging window too, so a resumed run logs the same windows as an uninterrupted one.
        if step % loop.log_every == 0 or step == run.total_steps or saving:
            seconds = time.perf_counter() - clock
            last = {"step": step, "lr": run.scheduler.get_last_lr()[0], "nonfinite_steps": state["nonfinite_steps"],
                    "tiles_per_second": tiles * accelerator.num_processes / seconds}  # fmt: skip
            if losses:  # none when every step of the window was skipped (loop.on_nonfinite=skip)
                last["loss"] = torch.stack(losses).mean().item()
                progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
            run.metrics.write(last)
            losses, tiles, clock = [], 0, time.perf_counter()
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
    """OUTPUT/student (HF-native InternVLVisionModel, no adaptors), OUTPUT/adaptors.safetensors, loss.png."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    out_dir = Path(run.config.loop.output_dir)
    if accelerator.is_main_process:
        save_run(out_dir, accelerator.unwrap_model(run.model), run.info, f"distill {run.config.student.preset}")
    accelerator.wait_for_everyone()
    return out_dir / "student"


def run_distill(config: DistillConfig) -> dict[str, Any]:
    with claim_output_dir(config.loop.output_dir):  # one run per output folder, for the whole run
        run = setup(config)
        metrics = train(run)
        out_dir = save(run)
        end_training(run.accelerator)
    return {"output": str(out_dir), "is_main_process": run.accelerator.is_main_process, "init": run.info["init"],
            **metrics}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return recipe_main("ivl.distill.train", DistillConfig, run_distill, argv)


if __name__ == "__main__":
    sys.exit(main())
