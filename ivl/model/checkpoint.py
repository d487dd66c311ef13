"""Resumable training checkpoints, written atomically, and the final adapter / model export.

    OUTPUT/checkpoints/step-000200/
        trainable.safetensors   every trainable parameter (LoRA, modules_to_save, full parts), by name
        optimizer.pt            optimizer state (tensors only: loads with weights_only=True)
        scheduler.pt
        rng-0.pt ...            torch CPU / CUDA RNG state of each process
        state.json              step, data position, the run's config and base fingerprint, and whatever the recipe
                                adds (e.g. MPO's reward shift)
        manifest.json           size and SHA-256 of every file above, written last (`ivl.model.integrity`)

A checkpoint is assembled in a hidden `.step-000200.tmp-HOST-PID` directory and renamed into place, so a crash mid-save
never leaves a directory that looks complete. A resume verifies the newest checkpoint against its manifest and falls
back to the newest good one, naming the bad file; it refuses a checkpoint of another run (config or base weights
changed) unless told `loop.resume=force`. A failed write (disk full, read-only) ends the run with one line naming the
path and the cause; the checkpoints already written are left as they were. Under FSDP2 the weights and optimizer state
are gathered whole first (`ivl.model.sharded`), so the files are the same as an unsharded run's.
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
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ivl.errors import CheckpointError  # noqa: F401  re-exported
from ivl.model.integrity import check_same_run, verify_checkpoint, write_manifest
from ivl.model.sharded import (
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state,
    load_full_state_dict,
)
from ivl.outputs import temporary_path, write_error

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
    """Write checkpoint `step` atomically (every process calls this) and prune to the newest `keep_last`. A failed
    write raises `OutputError` (on the process that failed; the launcher stops the others) and leaves the earlier
    checkpoints as they were."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = Path(broadcast_object_list([temporary_path(final)])[0])  # the main process's name, on every process
    unwrapped = accelerator.unwrap_model(model)
    if is_sharded(unwrapped):  # gathered on every process (collectives), written by the main one
        weights, optimizer_state = (
            full_state_dict(unwrapped, trainable_only=True),
            full_optimizer_state(unwrapped, optimizer),
        )
    else:
        weights, optimizer_state = None, None
    if accelerator.is_main_process:
        for stale in root.glob(".step-*.tmp*"):  # left by a killed run: the folder's lock says none is writing now
            shutil.rmtree(stale, ignore_errors=True)
        files = {
            "trainable.safetensors": trainable_state_dict(unwrapped) if weights is None else weights,
            "optimizer.pt": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler.pt": scheduler.state_dict(),
            "state.json": {"step": step, **state},
        }
        _write_files(tmp, files, final)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _write_files(tmp, {f"rng-{accelerator.process_index}.pt": rng}, final)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_files(tmp, {}, final, manifest=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
        # Checkpoints past this step belong to a continuation this run abandoned (it resumed from an earlier one
        # because they were unusable): they go first, so keep_last never drops a good checkpoint to keep them.
        found = list_checkpoints(output_dir)
        later = found[found.index(final) + 1 :]
        for old in later + found[: found.index(final) + 1][:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_files(directory: Path, files: dict[str, Any], final: Path, manifest: bool = False) -> None:
    """Write `files` (safetensors weights, torch-saved state, JSON) into `directory`, then the manifest if asked; a
    failure removes the unfinished directory and raises `OutputError` naming the file and the cause."""
    name = directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in ((directory / n, c) for n, c in files.items()):
            if name.suffix == ".safetensors":
                save_file(content, name)
            elif name.suffix == ".json":
                name.write_text(json.dumps(content, indent=2) + "\n")
            else:
                with name.open("wb") as handle:  # a Python file: a full disk raises OSError, not a C++ stream error
                    torch.save(content, handle)
        if manifest:
            name = directory / "manifest.json"
            write_manifest(directory)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(directory, ignore_errors=True)
        previous = list_checkpoints(final.parent.parent)
        kept = f"the last checkpoint, {previous[-1]}, is intact" if previous else "no earlier checkpoint exists"
        raise write_error(name, error, kept) from error


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: `auto` / `force` -> the newest one that verifies against its manifest (each
    bad one is reported through `say` and skipped), `never` -> None, else the given directory (which must verify)."""
    if resume == "never":
        if list_checkpoints(output_dir):
            # Keep-last-K pruning sorts by step, so an older run's later checkpoints would outlive this run's.
            raise CheckpointError(
                f"{Path(output_dir) / 'checkpoints'} holds checkpoints of an earlier run: use loop.resume=auto, "
                "another loop.output_dir, or delete them"
            )
        return None
    if resume in ("auto", "force"):
        bad = []
        for path in reversed(list_checkpoints(output_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            say(f"checkpoint {path} is unusable: {problem}; trying an earlier one")
            bad.append(f"{path.name}: {problem}")
        if bad:
            raise CheckpointError(
                f"no usable checkpoint in {Path(output_dir) / 'checkpoints'} ({'; '.join(bad)}): delete them to start "
                "afresh, or use another loop.output_dir"
            )
        return None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"loop.resume={resume}: not a checkpoint directory (no state.json)")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"loop.resume={resume}: {path} is unusable: {problem}")
    return path


def resume_point(
    resume: str,
    output_dir: str | Path,
    state: dict[str, Any],
    layout: dict[str, Any],
    record: dict[str, Any],
    say: Callable[[str], None] = print,
) -> Path | None:
    """The checkpoint a run continues from (None: a fresh start). Its saved state is merged into `state`, after
    checking that it was written with the same `layout` (processes, batch sizes, seed, data) and, unless
    loop.resume=force, by the same run: `record` (`ivl.model.integrity.run_record`: the config and the base weights'
    fingerprint). `state["run"]` is set to `record`, so every checkpoint the run writes records it."""
    resume_from = resolve_resume(resume, output_dir, say)
    if resume_from is not None:
        saved = read_checkpoint_state(resume_from)
        check_same_layout(resume_from, saved, layout)
        if resume != "force":
            check_same_run(resume_from, saved.get("run"), record)
        state.update(saved)
    state["run"] = record
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
    """Write the final adapter or model with its tokenizer and the kit's training info, atomically; a failed write
    raises `OutputError` naming the folder and the cause, and leaves the checkpoints to resume from."""
    tmp = temporary_path(out_dir)
    try:
        write(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out_dir, error, "the run's checkpoints, if any, are intact: rerun to resume") from error
    return out_dir


def read_training_info(path: str | Path) -> dict[str, Any]:
    info = Path(path) / TRAINING_INFO
    return json.loads(info.read_text()) if info.is_file() else {}
