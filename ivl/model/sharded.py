"""Whole (unsharded) weights and optimizer state of a model that FSDP2 shards across processes.

Under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp2.yaml`) every parameter is a DTensor that
holds only this process's rows, and the optimizer state is sharded the same way, so `model.state_dict()` /
`optimizer.state_dict()` would write one process's slice. These helpers use `torch.distributed.checkpoint`'s
state-dict API, which gathers full tensors to process 0 (on CPU) and scatters them back on load. They are
collectives: every process must call them, in the same order. Checkpoints written this way hold the same files and
names as unsharded runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded `model`'s parameters (DTensors)."""
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def full_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole tensors by parameter name, on CPU, on process 0 ({} on the others). `trainable_only`: only
    parameters with requires_grad (LoRA, modules_to_save, full parts), so a frozen base is never gathered."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Scatter whole tensors (every process passes the same `state`) into the sharded parameters they name."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper keeps the torch optimizer inside


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with whole tensors, keyed by parameter name, on process 0 ({} on the others)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=options)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state_dict=state, options=options)
