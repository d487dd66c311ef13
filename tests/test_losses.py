"""The memory-lean loss path: hidden states instead of logits, chunked log-probs, same numbers and gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ivl import losses
from ivl.data.chat import IGNORE_INDEX
from ivl.losses import num_supervised_tokens, supervised_tokens, token_cross_entropy, token_logps
from ivl.model.forward import final_hidden_states, output_layer
from ivl.model.load import ModelConfig, load_model


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    return model


def _batch(model, rows: int = 2, length: int = 40) -> dict:
    generator = torch.Generator().manual_seed(0)
    per_tile, image_token = 16, model.config.image_token_id
    input_ids = torch.randint(1, 500, (rows, length), generator=generator)
    input_ids[:, 2 : 2 + per_tile] = image_token  # one tile per row
    labels = input_ids.clone()
    labels[:, : 2 + per_tile + 4] = IGNORE_INDEX  # prompt and image unsupervised
    labels[1, -3:] = IGNORE_INDEX  # a padded tail
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    pixel_values = torch.randn(rows, 3, 112, 112, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}, labels


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_token_logps_match_full_log_softmax_values_and_gradients(monkeypatch):
    torch.manual_seed(0)
    lm_head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    monkeypatch.setattr(losses, "LOGITS_CHUNK_ELEMENTS", 50 * 4)  # 4 rows per chunk: 6 chunks, the last partial
    chunked = token_logps(lm_head, hidden, targets)
    chunked.square().sum().backward()  # a non-uniform upstream gradient
    chunked_grads = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad, lm_head.weight.grad = None, None
    full = torch.log_softmax(lm_head(hidden), dim=-1).gather(1, targets[:, None]).squeeze(1)
    full.square().sum().backward()
    torch.testing.assert_close(chunked, full.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grads[1], lm_head.weight.grad, rtol=1e-5, atol=1e-6)


def test_hidden_state_loss_equals_full_logits_cross_entropy(tiny):
    inputs, labels = _batch(tiny)
    hidden = final_hidden_states(tiny, inputs)
    logits = tiny(**inputs).logits
    torch.testing.assert_close(output_layer(tiny)(hidden), logits, rtol=0, atol=1e-5)
    tokens = supervised_tokens(hidden, labels)
    count = num_supervised_tokens(labels)
    assert tokens.targets.shape == (count,) and tokens.hidden.shape == (count, hidden.shape[-1])
    assert all(labels[r, c + 1] == t for r, c, t in zip(tokens.rows, tokens.cols, tokens.targets, strict=True))
    lean = -token_logps(output_layer(tiny), tokens.hidden, tokens.targets).sum() / count
    torch.testing.assert_close(lean, token_cross_entropy(logits, labels, count), rtol=1e-6, atol=1e-6)


def test_hidden_states_pass_through_peft_and_its_lora_weights_get_gradients(tiny):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.q_proj")
    peft_model = get_peft_model(tiny, config)
    try:
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(parameter, std=0.1)  # B = 0 at init would make LoRA a no-op
        inputs, labels = _batch(tiny)
        tokens = supervised_tokens(final_hidden_states(peft_model, inputs), labels)
        lean = -token_logps(output_layer(peft_model), tokens.hidden, tokens.targets).mean()
        reference = token_cross_entropy(peft_model(**inputs).logits, labels, num_supervised_tokens(labels))
        torch.testing.assert_close(lean, reference, rtol=1e-6, atol=1e-6)
        lean.backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        peft_model.unload()
        tiny.requires_grad_(True)  # PEFT froze the base; the fixture is shared


def test_no_tensor_of_the_full_logits_size_is_ever_built(tiny, monkeypatch):
    inputs, labels = _batch(tiny, rows=2, length=120)
    vocab_size = tiny.config.text_config.vocab_size
    monkeypatch.setattr(losses, "LOGITS_CHUNK_ELEMENTS", vocab_size * 8)
    with torch.no_grad():
        tokens = supervised_tokens(final_hidden_states(tiny, inputs), labels)
    assert tokens.targets.shape[0] > 8 * 20  # many chunks
    hidden = tokens.hidden.requires_grad_()  # the watch sees the loss's forward and backward only
    with _LargestTensor() as watch:
        token_logps(output_layer(tiny), hidden, tokens.targets).sum().backward()
    assert hidden.grad is not None and output_layer(tiny).weight.grad is not None
    assert watch.largest <= max(vocab_size * 8, output_layer(tiny).weight.numel())  # a chunk, or lm_head's gradient
    with _LargestTensor() as watch:
        tiny(**inputs).logits.sum()
    assert watch.largest >= 2 * 120 * vocab_size  # the watch does see the full logits when they are built
