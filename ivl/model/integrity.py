"""What makes a checkpoint trustworthy before a run continues from it: its files are whole, and it belongs to this run.

Whole: every checkpoint ends with `manifest.json`, the size and SHA-256 of each of its files, written after all of
them; `verify_checkpoint` re-reads the files against it (a truncated safetensors, a missing optimizer file, an empty
`step-N/`, a flipped byte). SHA-256 streams at about 0.4 GB/s on one CPU core: milliseconds for a LoRA checkpoint,
seconds per GB of fully trained weights and optimizer state, paid once per save and once per resume.

This run's: a checkpoint records the run's resolved config and a fingerprint of the base weights (`run_record`);
`check_same_run` refuses a resume whose config differs in a key that can change the result, or whose base weights
differ, and says how to override (loop.resume=force).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivl.errors import CheckpointError

MANIFEST = "manifest.json"
REQUIRED = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
SAMPLES_PER_TENSOR = 256
CHUNK_BYTES = 1 << 22

# Config keys that cannot change the trained weights: where and how often to log, evaluate and save, the step budget
# (a longer or shorter run continues the same one), and what to do about non-finite steps. Any other difference is a
# different run. Prefixes end with a dot.
RESULT_NEUTRAL = (
    "loop.output_dir", "loop.resume", "loop.max_steps", "loop.epochs", "loop.log_every", "loop.eval_every",
    "loop.eval_batch_size", "loop.exact_match_samples", "loop.max_new_tokens", "loop.save_every", "loop.keep_last",
    "loop.report_to", "loop.on_nonfinite", "data.validation", "data.validation_images", "eval.",
)  # fmt: skip
SHOWN_DIFFERENCES = 6


def write_manifest(directory: Path) -> None:
    """Record the size and checksum of every file in `directory`; call it after the last one is written."""
    files = {path.name: _describe(path) for path in sorted(directory.iterdir()) if path.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_checkpoint(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (naming the bad file), or None when every file matches its manifest."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the checkpoint is unfinished or was written by an older version)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"{MANIFEST} lists no {missing[0]}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} when written (truncated?)"
        if _describe(file)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted on disk)"
    return None


def weights_fingerprint(modules: Iterable[nn.Module]) -> str:
    """A cheap fingerprint of weights: every tensor's name, dtype and shape, and 256 evenly strided elements of each.

    Enough to tell bases apart: another checkpoint of the same architecture (a different release, a fine-tune, another
    seed) differs in almost every element of almost every tensor, so the samples differ; a different architecture,
    dtype or quantisation differs in the names, dtypes or shapes. What it does not see is an edit confined to the
    elements between the samples (say, one weight changed by hand). Reading ~256 elements per tensor instead of
    hashing gigabytes keeps it at milliseconds for any model size.
    """
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
                continue
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel():
                sample = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
                digest.update(sample.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_record(config: dict[str, Any], base_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint records about its run: the resolved config (plain JSON) and the base weights' fingerprint."""
    return {"config": json.loads(json.dumps(config)), "base": base_fingerprint}


def check_same_run(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to continue checkpoint `path` (written by the run `saved`) as the run `current` when its base weights
    or a result-changing config key differ."""
    if saved is None:
        return  # a checkpoint of an older version records no run: nothing to compare
    override = "resume anyway with loop.resume=force, or start afresh in another loop.output_dir"
    if saved["base"] != current["base"]:
        raise CheckpointError(
            f"{path} was trained on other base weights (fingerprint {saved['base']}, this run's base "
            f"{current['base']}): {override}"
        )
    old, new = _flatten(saved["config"]), _flatten(current["config"])
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key) and not _neutral(key)]
    if changed:
        shown = ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in changed[:SHOWN_DIFFERENCES])
        more = f" and {len(changed) - SHOWN_DIFFERENCES} more" if len(changed) > SHOWN_DIFFERENCES else ""
        raise CheckpointError(f"{path} belongs to a run with another config ({shown}{more}): {override}")


def _neutral(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in RESULT_NEUTRAL)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
