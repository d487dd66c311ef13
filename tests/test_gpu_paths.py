"""GPU paths decided on the CPU: fused AdamW, DDP's unused-parameter search, and no host-device sync in the loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from ivl.model.load import build_preset_model
from ivl.model.parts import model_parts
from ivl.model.presets import load_demo_tokenizer
from ivl.options import OptimConfig
from ivl.runtime import build_optimizer, find_unused_parameters_needed, fused_adamw, set_find_unused_parameters


def _param(device: str, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    # torch.device("cuda") exists without a GPU; the decision reads only the device and the dtype
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


def test_fused_adamw_is_chosen_from_the_parameters_device_and_dtype():
    assert fused_adamw([{"params": [_param("cuda"), _param("cuda", torch.bfloat16)]}])
    assert not fused_adamw([{"params": [_param("cuda")]}, {"params": [_param("cpu")]}])  # one CPU tensor: plain
    assert not fused_adamw([{"params": [_param("cuda", torch.int8)]}])  # fused kernels take floating point only
    assert not fused_adamw([{"params": []}])


def test_cpu_training_keeps_the_plain_adamw():
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.ones(3))]}], OptimConfig())
    assert type(optimizer) is torch.optim.AdamW and not optimizer.defaults["fused"]


@pytest.fixture(scope="module")
def tiny_model():
    return build_preset_model("tiny-112", load_demo_tokenizer())


def _train_only(model, *parts: str) -> None:
    handles = model_parts(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for part in parts:
        for parameter in getattr(handles, part).parameters():
            parameter.requires_grad_(True)


@pytest.mark.parametrize(
    "trained, text_only, needed",
    [(("llm",), True, False), (("projector", "llm"), False, False), (("projector", "llm"), True, True),
     (("vision",), True, True)],
)  # fmt: skip
def test_unused_parameter_search_only_when_text_only_batches_leave_trained_parts_idle(
    tiny_model, trained, text_only, needed
):
    _train_only(tiny_model, *trained)
    assert find_unused_parameters_needed(tiny_model, text_only) is needed


def test_the_decision_reaches_ddps_arguments():
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_find_unused_parameters(accelerator, False)
    assert "find_unused_parameters" not in accelerator.ddp_handler.to_kwargs()  # DDP's default: False
    set_find_unused_parameters(accelerator, True)
    assert accelerator.ddp_handler.to_kwargs()["find_unused_parameters"] is True
