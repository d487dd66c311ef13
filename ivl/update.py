"""The end of every optimizer step, shared by the recipes: clip the gradients, refuse a non-finite step, update.

A step whose loss or gradient norm is inf / NaN (a learning rate too high, an overflow, a poisoned row) would write
non-finite weights, and every later checkpoint and the final model with them. So the check comes before
`optimizer.step()`: under `loop.on_nonfinite=stop` (the default) the run ends there with a `DivergenceError` naming
the step and its rows, and nothing of that step reaches the weights, a checkpoint or the export (a checkpoint is only
written after a finished step, so keep_last never prunes a good one for it); under `skip` that one update is dropped
(the learning-rate schedule still advances) and the run goes on. The loss is the step's global loss and the gradient
norm is computed over the all-reduced (or FSDP2-sharded) gradients, so every process takes the same branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ivl.errors import DivergenceError

MAX_NAMED_ROWS = 8


def finish_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss: torch.Tensor,
    max_grad_norm: float,
    on_nonfinite: str,
    step: int,
    sources: Callable[[], list[str]],
) -> tuple[bool, torch.Tensor]:
    """Clip (max_grad_norm 0: no clipping, the norm is still measured), check, update the weights and the schedule.
    `loss` is the step's global loss, `step` the step's number (1-based), `sources()` this process's rows of the step
    (asked for only when the step is refused). Returns whether the update was applied and the gradient norm before
    clipping; raises `DivergenceError` under on_nonfinite=stop."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2 with every gradient on one mesh: a replicated DTensor
        norm = norm.full_tensor()
    # One device -> host copy for both numbers: the step's only synchronisation point added by this check.
    loss_value, grad_norm = torch.stack([loss.detach().float().reshape(()), norm.float().to(loss.device)]).tolist()
    # Under fp16 loss scaling, inf gradients are routine: the scaler skips that update and lowers the scale itself,
    # and it must see every `optimizer.step()` to do so. Only a non-finite loss is divergence there.
    scaled = accelerator.scaler is not None
    finite = math.isfinite(loss_value) and (scaled or math.isfinite(grad_norm))
    if finite or scaled:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not finite and on_nonfinite == "stop":
        rows = [row for rows in gather_object([sources()]) for row in rows]
        more = len(rows) - MAX_NAMED_ROWS
        named = ", ".join(rows[:MAX_NAMED_ROWS]) + (f" and {more} more" if more > 0 else "")
        raise DivergenceError(
            f"step {step}: the loss is {loss_value:g} and the gradient norm {grad_norm:g} (rows {named or 'none'}); "
            "the run stopped before this update, so no weights, checkpoint or export of it were written. Lower "
            "optim.lr (or check those rows), or set loop.on_nonfinite=skip to skip isolated bad steps"
        )
    return finite, norm
