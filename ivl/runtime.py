"""What every training recipe shares: the loop and optimizer config sections, the Accelerator, seeding, optimizer and
schedule, metrics (jsonl + Accelerate trackers), the progress bar and the loss-curve plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.modeling_layers import GradientCheckpointingLayer

from ivl.config import ConfigError
from ivl.options import LoopConfig, OptimConfig
from ivl.outputs import temporary_path, write_error


def make_accelerator(loop: LoopConfig, model_dtype: torch.dtype) -> Accelerator:
    """An Accelerator for the loop. A bf16/fp16 base needs autocast (its trainable weights are fp32 masters)."""
    mixed_precision = loop.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model_dtype, "no")
    elif mixed_precision == "no" and model_dtype != torch.float32:
        raise ConfigError(
            f"loop.mixed_precision=no with a {model_dtype} model: use loop.mixed_precision=auto "
            "(or model.dtype=float32)"
        )
    _check_trackers(loop.report_to)
    use_cpu_threads(loop.cpu_threads)
    # Accelerate only forms a multi-process CPU group when told the run is on CPU (e.g. under plain torchrun);
    # without this each process would train alone on its shard, silently.
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_process_cpu,
        mixed_precision=mixed_precision,
        log_with=loop.report_to or None,
        project_dir=loop.output_dir,
        # Text-only micro-batches leave the ViT / projector without gradients on that process; a recipe that knows
        # its model and data narrows this before `prepare` (`set_find_unused_parameters`).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    _check_backend(accelerator)
    set_seed(loop.seed, device_specific=False)
    return accelerator


def use_cpu_threads(threads: int) -> None:
    """`loop.cpu_threads`: torch's CPU operators use `threads` threads from here on (0: leave torch's default). CPU
    float sums depend on the thread count, so a run is only reproducible at a fixed count."""
    if threads:
        torch.set_num_threads(threads)


def _check_backend(accelerator: Accelerator) -> None:
    """DDP and FSDP2 are supported (configs/accelerate/); FSDP1 and DeepSpeed are refused, with the reason."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "DeepSpeed is not supported by this release: its ZeRO checkpoints and final export are untested here "
            "(no DeepSpeed on our machines); launch with configs/accelerate/fsdp2.yaml (shards parameters, gradients "
            "and optimizer state like ZeRO-3) or configs/accelerate/ddp.yaml"
        )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "FSDP version 1 is not supported (its flat parameters break per-part freezing and LoRA checkpoints): set "
            "fsdp_version: 2 in the accelerate config, as configs/accelerate/fsdp2.yaml does"
        )


def find_unused_parameters_needed(model: nn.Module, text_only_batches: bool) -> bool:
    """Whether DDP must search each step's graph for trainable parameters that got no gradient (a traversal of the
    autograd graph per step, and no gradient bucket is all-reduced before the backward pass ends). A micro-batch leaves
    parameters out when it is text-only and the ViT, the projector or partial LoRA (image positions only) trains, or
    whenever a mixture-of-experts LLM trains (experts no token was routed to)."""
    from ivl.model.moe import is_moe
    from ivl.model.partial_lora import partial_lora_of
    from ivl.model.parts import model_parts

    parts = model_parts(model)
    if is_moe(model) and any(p.requires_grad for p in parts.llm.parameters()):
        return True
    image_side = (p.requires_grad for module in (parts.vision, parts.projector) for p in module.parameters())
    return text_only_batches and (any(image_side) or partial_lora_of(model) is not None)


def set_find_unused_parameters(accelerator: Accelerator, needed: bool) -> None:
    """DDP's `find_unused_parameters` for the model `accelerator.prepare` wraps next."""
    if accelerator.ddp_handler is not None:
        accelerator.ddp_handler.find_unused_parameters = needed


def shard_per_layer(accelerator: Accelerator, layer_class_names: list[str]) -> None:
    """Under FSDP2, make each transformer layer (of the classes named) its own shard unit, unless the accelerate
    config names its own classes: InternVL models list no `_no_split_modules`, so Accelerate's transformer-based
    policy would otherwise put the whole model in one unit and gather all of it at once."""
    plugin = accelerator.state.fsdp_plugin if accelerator.is_fsdp2 else None
    if plugin is not None and not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = layer_class_names


def _check_trackers(names: list[str]) -> None:
    """Accelerate silently drops trackers whose package is missing; a user who asked for one wants to know."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in LoggerType.list():
            raise ConfigError(
                f"loop.report_to: unknown tracker {name!r}; Accelerate knows {', '.join(LoggerType.list())}"
            )
        if name not in available:
            raise ConfigError(f"loop.report_to: {name} is not installed (pip install {name})")


def start_trackers(accelerator: Accelerator, project: str, config: dict[str, Any]) -> None:
    """Open the trackers asked for in loop.report_to, with the run's config as hyper-parameters (scalars only)."""
    if not accelerator.log_with:
        return
    flat = {}
    for section, values in config.items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}" if key else section] = value
    accelerator.init_trackers(project, config=flat)


def end_training(accelerator: Accelerator) -> None:
    """Close the trackers and the process group, after the last collective has been fully torn down.

    Gloo's worker thread destroys a finished collective's work object (a barrier's tensors) under the GIL, while the
    process group's destructor joins that thread holding the GIL: if the group goes while a barrier is still being torn
    down, the process hangs at exit (seen under load in 2-process CPU runs: `~ProcessGroupGloo` in `thread::join`,
    the worker in `~AsyncBarrierWork` waiting for the GIL). Sleeping releases the GIL so the worker can finish first.
    """
    if accelerator.num_processes > 1:
        time.sleep(0.5)
    accelerator.end_training()


def checkpoint_activations(module: nn.Module, every: int = 1) -> None:
    """Recompute the activations of every `every`-th layer of `module` (layers 0, every, 2 * every, ...) in the
    backward pass (non-reentrant checkpointing); the other layers keep theirs. transformers 5.24 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable` and warns on every call of the old name; the
    5.x releases before it have only the old one. Only 5.24 takes `every_n_layers`, so the layers' own flags are set
    here, by the same rule, for every version."""
    enable = getattr(module, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [layer for layer in module.modules() if isinstance(layer, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0


def fused_adamw(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW can run the update: every parameter a floating-point tensor on CUDA. It updates
    all parameters in a few kernels instead of several per parameter tensor (LoRA adds hundreds of small ones); on
    CPU the plain implementation stays (its fused kernel is not faster there)."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)


def build_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    kwargs = {"betas": tuple(optim.betas), "eps": optim.eps}
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs, fused=fused_adamw(groups) or None)
    try:
        import bitsandbytes.optim as bnb_optim  # optional backend: imported only when asked for
    except ImportError as error:
        raise ConfigError(f"optim.optimizer={optim.optimizer} needs bitsandbytes (pip install bitsandbytes)") from error

    optimizer_class = {"adamw_8bit": bnb_optim.AdamW8bit, "paged_adamw_8bit": bnb_optim.PagedAdamW8bit}
    return optimizer_class[optim.optimizer](groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    warmup_steps = math.ceil(optim.warmup_ratio * total_steps)
    if optim.schedule == "cosine":
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": optim.min_lr_ratio},
        )
    name = {"linear": "linear", "constant": "constant_with_warmup"}[optim.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


class MetricsLog:
    """Metrics as one JSON object per line in `path` (main process only), mirrored to the Accelerate trackers."""

    def __init__(self, path: str | Path, accelerator: Accelerator):
        self.path = Path(path)
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise write_error(self.path, error) from error
        if self.accelerator.log_with:
            step = record.get("step")
            values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(values, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites them), so the file reads as one uninterrupted run."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = [json.dumps(record) for record in read_metrics(self.path) if record.get("step", 0) <= step]
        tmp = temporary_path(self.path)
        try:
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise write_error(self.path, error) from error


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that does not parse (the last one, cut short when a run was killed
    mid-write) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def progress_bar(accelerator: Accelerator, total: int, initial: int, description: str) -> tqdm | LogProgress:
    """The training loop's progress, on the main process only."""
    return progress(None, total, description, "step", accelerator.is_main_process, initial=initial)


def progress(
    iterable: Iterable | None, total: int, description: str, unit: str = "it", enabled: bool = True, initial: int = 0
) -> tqdm | LogProgress:
    """A tqdm bar on a terminal; in a log (stderr is a file or a pipe) plain periodic lines instead, which a log
    file shows as they are rather than as a string of carriage-return frames."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True,
                    leave=iterable is None, disable=not enabled)  # fmt: skip
    return LogProgress(iterable, total, description, unit, enabled, initial)


class LogProgress:
    """Progress for logs: one line `sft: 120/1000 step (12%), 2.50 step/s, loss=0.3127` when it starts, then at most
    every `interval` seconds, and when it ends. The same calls as tqdm's that the kit uses (iterate, update,
    set_postfix, close)."""

    interval = 30.0  # seconds between lines

    def __init__(self, iterable: Iterable | None, total: int, description: str, unit: str, enabled: bool, initial: int):
        self.iterable, self.total, self.description, self.unit = iterable, total, description, unit
        self.enabled, self.n, self.start_n, self.postfix = enabled, initial, initial, ""
        self.start = self.last_line = time.monotonic()
        self.printed_n: int | None = None
        self._line()

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= self.interval:
            self._line()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in {**(ordered_dict or {}), **values}.items())

    def close(self) -> None:
        if self.printed_n != self.n:
            self._line()

    def _line(self) -> None:
        self.last_line, self.printed_n = time.monotonic(), self.n
        if not self.enabled:
            return
        elapsed, done = self.last_line - self.start, self.n - self.start_n
        rate = f", {done / elapsed:.2f} {self.unit}/s" if elapsed > 0 and done > 0 else ""
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.description}: {self.n}/{self.total} {self.unit}{percent}{rate}{postfix}", file=sys.stderr,
              flush=True)  # fmt: skip


def plot_curves(metrics_path: str | Path, out_path: str | Path, title: str) -> Path | None:
    """Training (and evaluation) loss against step, as a PNG; None when there is nothing to plot."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evaluation = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for points, label, style in ((train, "train loss", "-"), (evaluation, "validation loss", "o-")):
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, style, label=label, markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (per supervised token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path)
    plt.close(figure)
    return Path(out_path)
