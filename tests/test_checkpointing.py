"""Gradient checkpointing of every k-th layer (`llm.checkpoint_every`, `vision.checkpoint_every`): the right layers
recompute their forward in the backward pass, and the gradients equal those of the run without checkpointing."""

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from ivl.config import ConfigError, load_config
from ivl.finetune.options import SFTConfig
from ivl.model.parts import model_parts
from ivl.model.presets import TINY_LLM, TINY_VISION, _make_config
from ivl.training import enable_gradient_checkpointing


def _config(*overrides: str) -> SFTConfig:
    return load_config(SFTConfig, None, ["data.train=unused", *overrides])


def _forward_calls(model) -> dict[int, int]:
    """Forward passes of each LLM decoder layer during one forward + backward (a recomputed layer runs twice), seen
    at its MLP: transformers checkpoints a layer's `forward`, so hooks on the layer itself run once."""
    calls = dict.fromkeys(range(len(model_parts(model).llm_layers)), 0)
    handles = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model_parts(model).llm_layers)]  # fmt: skip
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize("every, recomputed", [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (4, [0])])
def test_every_kth_llm_layer_is_recomputed_and_the_gradients_do_not_change(every, recomputed):
    torch.manual_seed(0)
    text = {**TINY_LLM, "model_type": "qwen2", "num_hidden_layers": 4, "vocab_size": 512}
    model = InternVLForConditionalGeneration(_make_config(TINY_VISION, text, 500, image_size=112))
    model.train()
    assert _forward_calls(model) == {0: 1, 1: 1, 2: 1, 3: 1}
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    enable_gradient_checkpointing(model, _config("llm.gradient_checkpointing=true", f"llm.checkpoint_every={every}"))
    calls = _forward_calls(model)
    assert [index for index, count in calls.items() if count == 2] == recomputed
    assert set(calls.values()) <= {1, 2}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 1"):
        _config("llm.checkpoint_every=0")
