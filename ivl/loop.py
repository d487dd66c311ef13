"""The skeleton every training recipe's loop shares: where a run is (`TrainState`), resuming it, the log / eval / save
cadence, the accumulate-and-step tail and the number of steps. A recipe keeps its own loop, which reads:

    loop = TrainingLoop(run, "sft", layout, TrainState(skipped_rows=...))
    batches = loop.start(partial(training_batches, run))     # resumed: the data position and RNG are the saved ones
    for window in loop.steps(batches):                       # grad_accum micro-batches per optimizer step
        result = accumulate_and_step(run, window, forward)   # forward + backward, clip, step, schedule, zero_grad
        if loop.log_due(): loop.log({...})
        if loop.eval_due(): loop.last.update(evaluate(...))
        if loop.save_due(): loop.save({...})

Nothing here knows a recipe's data or loss: `forward` and the batches come from the recipe.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sized
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import nn

from ivl.config import to_dict
from ivl.model.checkpoint import load_training_checkpoint, resume_point, save_training_checkpoint
from ivl.model.integrity import run_record
from ivl.options import LoopConfig, OptimConfig
from ivl.outputs import claim_output_dir
from ivl.runtime import MetricsLog, end_training, progress_bar
from ivl.update import finish_step

Batch = dict[str, Any]


class RecipeConfig(Protocol):
    optim: OptimConfig
    loop: LoopConfig


class TrainingRun(Protocol):
    """What a recipe's `setup` builds that the loop needs (each recipe's `Run` dataclass has these fields)."""

    config: RecipeConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    metrics: MetricsLog
    info: dict[str, Any]  # with "base_fingerprint" (`ivl.model.integrity.weights_fingerprint` of the base)


@dataclass
class TrainState:
    """Where a run is. Saved with every checkpoint (flat, in its state.json) and restored on resume."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # per process: where the step-aligned sampler restarts
    skipped_rows: int = 0  # rows left out so far (by the data check, then by collators that report `num_skipped`)
    nonfinite_steps: int = 0  # updates dropped because the loss or gradient norm was not finite (on_nonfinite=skip)
    recipe: dict[str, Any] = field(default_factory=dict)  # the recipe's own: MPO's reward shift, the packers' states

    def saved(self) -> dict[str, Any]:
        """The state.json fields besides the step (which the checkpoint writes itself)."""
        return {"micro_batches": self.micro_batches, "skipped_rows": self.skipped_rows,
                "nonfinite_steps": self.nonfinite_steps, **self.recipe}  # fmt: skip

    @classmethod
    def from_saved(cls, saved: dict[str, Any], layout: dict[str, Any], fresh: TrainState) -> TrainState:
        """Read back `saved()` (a state.json, which also holds the run layout); fields an older checkpoint lacks
        keep their `fresh` values."""
        own = {"step", "micro_batches", "skipped_rows", "nonfinite_steps", "run"}  # "run": the run record
        recipe = {k: v for k, v in saved.items() if k not in own and k not in layout}
        return cls(saved["step"], saved.get("micro_batches", fresh.micro_batches),
                   saved.get("skipped_rows", fresh.skipped_rows), saved.get("nonfinite_steps", 0), recipe)  # fmt: skip


@dataclass
class StepResult:
    """One optimizer step, as tensors on the device (`.item()` them only when logging: each one syncs)."""

    loss: torch.Tensor  # [] the step's loss, averaged over processes the way the gradients are
    grad_norm: torch.Tensor  # [] total gradient norm before clipping (measured with optim.max_grad_norm=0 too)
    applied: bool = True  # False: the loss or norm was not finite and loop.on_nonfinite=skip dropped the update


@dataclass
class RunResult:
    """What a finished training run reports: where its final adapter / model / student went and its last logged and
    evaluated metrics. Every process returns one; only the main process prints it."""

    output: str
    metrics: dict[str, float]
    is_main_process: bool

    def summary(self) -> str:
        """The run's summary as every launcher prints it (`ivl sft`, `python -m ...`, `accelerate launch -m ...`)."""
        return json.dumps({"output": self.output, **self.metrics}, indent=2)


def count_steps(loop: LoopConfig, dataset: Sized | None, num_processes: int) -> int:
    """Optimizer steps of a run: loop.max_steps, else as many as loop.epochs over `dataset` give (the sampler drops a
    partial global batch). `dataset` may be None (a stream) only when loop.max_steps is set."""
    if loop.max_steps:
        return loop.max_steps
    batches_per_epoch = len(dataset) // (loop.batch_size * num_processes)
    return max(1, math.ceil(loop.epochs * batches_per_epoch / loop.grad_accum))


def batch_locations(window: list[Batch]) -> list[str]:
    """The `file:line` of every row of a step's micro-batches (collators put them in `locations`)."""
    return [location for batch in window for location in batch.get("locations", [])]


def accumulate_and_step(
    run: TrainingRun,
    window: list[Batch],
    forward: Callable[[Batch], torch.Tensor],
    step: int,
    autocast: bool = True,
    sources: Callable[[list[Batch]], list[str]] = batch_locations,
) -> StepResult:
    """Forward + backward over one optimizer step's micro-batches, then the update: clip the gradient norm, refuse a
    non-finite step (`ivl.update.finish_step`: stop naming step `step` and the rows `sources(window)`, or skip it
    under loop.on_nonfinite=skip), step the optimizer and the schedule, zero the gradients.

    `forward(batch)` returns the micro-batch's share of the step loss: shares summed over the micro-batches of every
    process make num_processes x the step loss, because DDP averages gradients over processes. With `autocast` the
    forward runs under the Accelerator's mixed-precision autocast (off: the recipe's forward places it itself)."""
    accelerator, model = run.accelerator, run.model
    step_loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(window):
        last = index == len(window) - 1
        with nullcontext() if last else accelerator.no_sync(model):  # gradients all-reduce on the last one only
            with accelerator.autocast() if autocast else nullcontext():
                loss = forward(batch)
            accelerator.backward(loss)
        step_loss += loss.detach()
    step_loss = accelerator.reduce(step_loss, "sum") / accelerator.num_processes
    applied, grad_norm = finish_step(accelerator, model, run.optimizer, run.scheduler, step_loss,
                                     run.config.optim.max_grad_norm, run.config.loop.on_nonfinite, step,
                                     lambda: sources(window))  # fmt: skip
    return StepResult(step_loss, grad_norm, applied)


class TrainingLoop:
    """The bookkeeping around a recipe's loop: resume, the step count, cadences, logging, checkpoints.

    `layout` names what the saved data position depends on besides the processes, batch sizes and seed (e.g. the
    number of training samples): a checkpoint written with another layout is refused on resume. `fresh` is the state
    of a run that starts from nothing."""

    def __init__(self, run: TrainingRun, name: str, layout: dict[str, Any], fresh: TrainState | None = None):
        loop, accelerator = run.config.loop, run.accelerator
        self.run, self.name, self.config = run, name, loop
        self.layout = {"num_processes": accelerator.num_processes, "batch_size": loop.batch_size,
                       "grad_accum": loop.grad_accum, "seed": loop.seed, **layout}  # fmt: skip
        self.state = fresh or TrainState()
        # What every checkpoint records so that a resume continues only this run (config and base weights).
        self.record = run_record(to_dict(run.config), run.info["base_fingerprint"])
        self.last: dict[str, float] = {}  # the last logged values and what evaluation added since
        self._clock = time.perf_counter()
        self._progress = None

    def start(self, make_batches: Callable[[TrainState], Iterator[Batch]]) -> Iterator[Batch]:
        """Continue from the checkpoint loop.resume names (or start afresh) and return the micro-batches from there.

        Ordering: `make_batches(state)` runs before the saved RNG state is restored, because creating a DataLoader
        iterator draws its workers' base seed from the global RNG; the uninterrupted run drew it at the same point."""
        run = self.run
        saved: dict[str, Any] = {}
        resume_from = resume_point(self.config.resume, self.config.output_dir, saved, self.layout, self.record,
                                   run.accelerator.print)  # fmt: skip
        if resume_from is not None:
            self.state = TrainState.from_saved(saved, self.layout, self.state)
        batches = make_batches(self.state)
        if resume_from is not None:
            load_training_checkpoint(resume_from, run.accelerator, run.model, run.optimizer, run.scheduler)
            run.accelerator.print(f"resumed from {resume_from} at step {self.state.step}")
        run.metrics.truncate_after(self.state.step)
        return batches

    def steps(self, batches: Iterator[Batch]) -> Iterator[list[Batch]]:
        """Each remaining optimizer step's window of loop.grad_accum micro-batches; `state.step` already counts the
        step being made."""
        self._progress = progress_bar(self.run.accelerator, self.run.total_steps, self.state.step, self.name)
        self._clock = time.perf_counter()
        self.run.model.train()
        try:
            while self.state.step < self.run.total_steps:
                window = [next(batches) for _ in range(self.config.grad_accum)]
                self.state.micro_batches += len(window)
                self.state.skipped_rows += sum(batch.get("num_skipped", 0) for batch in window)
                self.state.step += 1
                yield window
                self._progress.update(1)
        finally:
            self._progress.close()

    def save_due(self) -> bool:
        return bool(self.config.save_every) and self.state.step % self.config.save_every == 0

    def log_due(self) -> bool:
        # A checkpoint closes the logging window too, so a resumed run logs the same windows as an uninterrupted one.
        step = self.state.step
        return step % self.config.log_every == 0 or step == self.run.total_steps or self.save_due()

    def eval_due(self) -> bool:
        """Mid-run evaluation (the final one is the recipe's, after the loop)."""
        step, every = self.state.step, self.config.eval_every
        return bool(every) and step % every == 0 and step < self.run.total_steps

    def per_second(self, count: float) -> float:
        """`count` things of this process since the last log, as a rate over all processes."""
        return count * self.run.accelerator.num_processes / (time.perf_counter() - self._clock)

    def log(self, values: dict[str, float], show: tuple[str, ...] = ("loss", "lr")) -> None:
        """Write {step, values, lr} to metrics.jsonl (and the trackers), show the `show` ones on the progress bar and
        start the next logging window."""
        self.last = {"step": self.state.step, **values, "lr": self.run.scheduler.get_last_lr()[0],
                     "nonfinite_steps": self.state.nonfinite_steps}  # fmt: skip
        self.run.metrics.write(self.last)
        if self._progress is not None:  # a window whose every step was skipped has no loss to show
            self._progress.set_postfix({name: f"{self.last[name]:.4g}" for name in show if name in self.last})
        self._clock = time.perf_counter()

    def save(self, recipe_state: dict[str, Any] | None = None) -> None:
        """A resumable checkpoint of this step (every process calls this), with the recipe's own state."""
        self.state.recipe.update(recipe_state or {})
        run, saved = self.run, {**self.layout, **self.state.saved(), "run": self.record}
        save_training_checkpoint(self.config.output_dir, self.state.step, run.accelerator, run.model, run.optimizer,
                                 run.scheduler, saved, self.config.keep_last)  # fmt: skip


def run_recipe(config: RecipeConfig, setup: Callable[[Any], TrainingRun], train: Callable[[Any], dict[str, float]],
               save: Callable[[Any], Any]) -> RunResult:
    """setup -> train -> save -> end, holding the output folder's lock for the whole run (one run per folder), so no
    recipe can forget it."""
    with claim_output_dir(config.loop.output_dir):
        run = setup(config)
        metrics = train(run)
        out_dir = save(run)
        end_training(run.accelerator)
    return RunResult(str(out_dir), metrics, run.accelerator.is_main_process)
