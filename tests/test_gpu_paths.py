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


def test_supervised_positions_are_found_on_the_host_and_only_copied_to_the_device():
    """The meta device stands in for a GPU: any data-dependent op (nonzero, item, boolean indexing) on a tensor there
    raises, as it would make the host wait for a GPU."""
    from ivl.data.chat import IGNORE_INDEX
    from ivl.losses import supervised_tokens

    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    supervised = supervised_tokens(torch.zeros(2, 4, 3, device="meta"), labels)
    assert supervised.hidden.device.type == "meta" and supervised.hidden.shape == (4, 3)
    expected = supervised_tokens(torch.zeros(2, 4, 3), labels)  # the same positions, found on the CPU
    assert (expected.rows.tolist(), expected.cols.tolist(), expected.targets.tolist()) == ([0, 0, 1, 1], [0, 1, 1, 2],
                                                                                           [5, 6, 7, 8])  # fmt: skip
    with pytest.raises((NotImplementedError, RuntimeError)):  # what the old way (labels on the device) would do
        supervised_tokens(torch.zeros(2, 4, 3, device="meta"), labels.to("meta"))


def test_sft_loss_path_makes_no_device_to_host_sync(shapes, monkeypatch):
    """forward_loss with the LLM's hidden states and the lm_head on the meta device (the model's forward itself runs
    on the CPU): the index, the weights and the loss go through without a single data-dependent op on the device."""
    import copy

    import ivl.evaluate
    import ivl.finetune.sft
    from ivl.data.samples import SampleBuilder, SFTDataset, collate, load_records
    from ivl.finetune.sft import forward_loss
    from ivl.model.load import load_model
    from ivl.options import DataConfig, ModelConfig

    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    builder = SampleBuilder(tokenizer, model.config, DataConfig(train=str(shapes / "train.jsonl"), max_tiles=1))
    dataset = SFTDataset(load_records(str(shapes / "train.jsonl")), builder)
    batch = collate([dataset[0], dataset[1]], tokenizer.pad_token_id)
    final_hidden_states, lm_head = ivl.evaluate.final_hidden_states, copy.deepcopy(model.lm_head).to("meta")
    on_meta = lambda m, inputs: final_hidden_states(m, inputs).to("meta")  # noqa: E731
    monkeypatch.setattr(ivl.evaluate, "final_hidden_states", on_meta)
    monkeypatch.setattr(ivl.finetune.sft, "output_layer", lambda m: lm_head)  # the SFT loss reads lm_head itself
    config = SimpleNamespace(loss=SimpleNamespace(reduction="square", kernel="torch"))
    cpu = SimpleNamespace(device=torch.device("cpu"))
    run = SimpleNamespace(
        model=model, accelerator=cpu, dtype=torch.float32, info={"modes": {"llm": "lora"}}, config=config
    )
    loss = forward_loss(run, batch, torch.tensor(10.0, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
