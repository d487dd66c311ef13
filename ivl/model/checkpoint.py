"""Resumable training checkpoints, written atomically, and the final adapter / model export.

    OUTPUT/checkpoints/step-000200/
        trainable.safetensors   every trainable parameter (LoRA, modules_to_save, full parts), by name
        optimizer.pt            optimizer state (tensors only: loads with weights_only=True)
        scheduler.pt
        rng-0.pt ...            torch CPU / CUDA RNG state of each process
        state.json              step, data position, and whatever the recipe adds (e.g. MPO's reward shift)

A checkpoint is assembled in a hidden `.step-000200.tmp` directory and renamed into place, so a crash mid-save never
leaves a directory that looks complete; `latest_checkpoint` only ever sees finished ones. Under FSDP2 the weights and
optimizer state are gathered whole first (`ivl.model.sharded`), so the files are the same as an unsharded run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from ivl.errors import CheckpointError  # noqa: F401  re-exported
from ivl.model.sharded import (
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state,
    load_full_state_dict,
)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
TRAINING_INFO = "ivl_training.json"  # what the kit needs to rebuild the model around an adapter


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` (whole tensors by name) into the trainable parameters, sharded (FSDP2) or not."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(state):
        missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
        raise CheckpointError(
            f"{source} does not match this run's trainable parameters (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): was it written with another adapter / parts config?"
        )
    mismatched = [name for name, p in parameters.items() if p.shape != state[name].shape]  # DTensor: whole shape
    if mismatched:
        raise CheckpointError(
            f"{source}: {mismatched[0]} has shape {tuple(state[mismatched[0]].shape)} there but "
            f"{tuple(parameters[mismatched[0]].shape)} in this run (was adapter.r or the model changed?)"
        )
    if is_sharded(model):
        load_full_state_dict(model, state)
        return
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])


def save_training_checkpoint(
    output_dir: str | Path,
    step: int,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically (every process calls this) and prune to the newest `keep_last`."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    unwrapped = accelerator.unwrap_model(model)
    if is_sharded(unwrapped):  # gathered on every process (collectives), written by the main one
        weights, optimizer_state = (
            full_state_dict(unwrapped, trainable_only=True),
            full_optimizer_state(unwrapped, optimizer),
        )
    else:
        weights, optimizer_state = None, None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state_dict(unwrapped) if weights is None else weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `auto` -> the newest one if any, `never` -> None, else the given directory."""
    if resume == "never":
        if list_checkpoints(output_dir):
            # Keep-last-K pruning sorts by step, so an older run's later checkpoints would outlive this run's.
            raise CheckpointError(
                f"{Path(output_dir) / 'checkpoints'} holds checkpoints of an earlier run: use loop.resume=auto, "
                "another loop.output_dir, or delete them"
            )
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"loop.resume={resume}: not a checkpoint directory (no state.json)")
    return path


def resume_point(resume: str, output_dir: str | Path, state: dict[str, Any], layout: dict[str, Any]) -> Path | None:
    """The checkpoint a run continues from (None: a fresh start). Its saved state is merged into `state`, after
    checking that it was written with the same `layout` (processes, batch sizes, seed, data)."""
    resume_from = resolve_resume(resume, output_dir)
    if resume_from is not None:
        state.update(read_checkpoint_state(resume_from))
        check_same_layout(resume_from, state, layout)
    return resume_from


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The step, data position and recipe state saved with a checkpoint."""
    return json.loads((path / "state.json").read_text())


def check_same_layout(path: Path, saved: dict[str, Any], layout: dict[str, Any]) -> None:
    """The saved data position only means the same thing with the same processes, batch sizes, seed and data."""
    changed = [
        f"{key} {saved[key]} -> {value}" for key, value in layout.items() if key in saved and saved[key] != value
    ]
    if changed:
        raise CheckpointError(
            f"{path} was written with a different run layout ({', '.join(changed)}); resume with the same settings, "
            "or start afresh (loop.resume=never, another loop.output_dir)"
        )


def load_training_checkpoint(
    path: Path, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    """Restore weights, optimizer, scheduler and this process's RNG (read the saved state with
    `read_checkpoint_state`)."""
    unwrapped = accelerator.unwrap_model(model)
    load_trainable_state_dict(unwrapped, load_file(path / "trainable.safetensors"), path)
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    if is_sharded(unwrapped):
        load_full_optimizer_state(unwrapped, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{path} was written by fewer processes (no {rng_file.name}); resume with as many")
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def export_final(
    out_dir: Path, model: nn.Module, tokenizer, info: dict[str, Any], write: Callable[[nn.Module, Path], None]
) -> Path:
    """Write the final adapter or model with its tokenizer and the kit's training info, atomically."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(model, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def read_training_info(path: str | Path) -> dict[str, Any]:
    info = Path(path) / TRAINING_INFO
    return json.loads(info.read_text()) if info.is_file() else {}
