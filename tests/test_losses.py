"""The memory-lean loss path: hidden states instead of logits, chunked log-probs, same numbers and gradients."""

import pytest
import torch
import torch.nn.functional as F
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


# --- the SFT loss with its gradient computed in the forward pass (linear_cross_entropy) ------------------------------


def _weighted_batch(reduction: str, rows: int = 3, length: int = 30, vocab: int = 50):
    """Labels with a supervised answer per row (lengths differ, so sample / square weights differ) and their weights."""
    from ivl.losses import supervised_weights

    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    starts = [5, 12, 20][:rows]
    sample_tokens = torch.zeros(rows, length, dtype=torch.long)
    for row, start in enumerate(starts):
        labels[row, :start] = IGNORE_INDEX
        sample_tokens[row] = length - start
    return labels, supervised_weights(labels, sample_tokens, reduction)


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_torch_cross_entropy_in_loss_and_gradients(reduction, bias, monkeypatch):
    from ivl.losses import linear_cross_entropy, weighted_nll

    torch.manual_seed(0)
    vocab, width = 50, 16
    labels, weights = _weighted_batch(reduction, vocab=vocab)
    hidden_all = torch.randn(*labels.shape, width)
    tokens = supervised_tokens(hidden_all, labels)
    lm_head = nn.Linear(width, vocab, bias=bias)
    monkeypatch.setattr(losses, "LOSS_CHUNK_BYTES", vocab * 8 * 7)  # 7 rows per chunk: several, the last partial
    assert losses.loss_chunk_rows(vocab, torch.float32, torch.device("cpu")) == 7
    denominator = weights.sum() * 0.5  # any step denominator (here not this batch's own)

    def grads(loss_of):
        hidden = tokens.hidden.clone().requires_grad_()
        lm_head.zero_grad(set_to_none=True)
        loss = loss_of(hidden)
        loss.backward()
        return loss.detach(), hidden.grad, lm_head.weight.grad, lm_head.bias.grad if bias else None

    ours = grads(lambda h: linear_cross_entropy(lm_head, h, tokens.targets, weights) / denominator)
    if reduction == "token":  # every weight is 1: torch's own summed cross-entropy
        reference = grads(lambda h: F.cross_entropy(lm_head(h), tokens.targets, reduction="sum") / denominator)
    else:
        per_token = lambda h: F.cross_entropy(lm_head(h), tokens.targets, reduction="none")  # noqa: E731
        reference = grads(lambda h: weighted_nll(-per_token(h), weights, denominator))
    for got, expected in zip(ours, reference, strict=True):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_linear_cross_entropy_computes_no_lm_head_gradient_when_it_is_frozen_and_never_builds_full_logits(
    monkeypatch,
):
    from ivl.losses import linear_cross_entropy

    torch.manual_seed(0)
    vocab, width, rows = 300, 8, 200
    lm_head = nn.Linear(width, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(rows, width, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    monkeypatch.setattr(losses, "LOSS_CHUNK_BYTES", vocab * 8 * 16)  # 16 rows per chunk
    with _LargestTensor() as watch:
        loss = linear_cross_entropy(lm_head, hidden, targets, torch.ones(rows))
        loss.backward()
    assert lm_head.weight.grad is None
    assert watch.largest <= 16 * vocab  # one chunk of logits, never [N, V], and no [V, H] weight gradient built
    reference = hidden.detach().clone().requires_grad_()
    F.cross_entropy(lm_head(reference), targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-6, atol=1e-7)


def test_linear_cross_entropy_falls_back_to_the_recomputing_path_for_a_wrapped_lm_head():
    from ivl.losses import linear_cross_entropy

    torch.manual_seed(0)

    class Wrapped(nn.Linear):  # its own forward, as a 4-bit linear's (a PEFT wrapper is not an nn.Linear at all)
        def forward(self, x):
            return super().forward(x) * 1.0

    lm_head = Wrapped(8, 40, bias=False)
    hidden, targets, weights = torch.randn(9, 8), torch.randint(0, 40, (9,)), torch.rand(9)
    expected = (weights * F.cross_entropy(lm_head(hidden), targets, reduction="none")).sum()
    torch.testing.assert_close(linear_cross_entropy(lm_head, hidden, targets, weights), expected, rtol=1e-6, atol=1e-6)


def _liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _liger_available(), reason="Liger's kernel needs CUDA and liger-kernel")
@pytest.mark.parametrize("reduction", ["token", "square"])
def test_liger_kernel_equals_the_torch_path(reduction):
    from ivl.losses import linear_cross_entropy

    torch.manual_seed(0)
    labels, weights = _weighted_batch(reduction, vocab=1000)
    tokens = supervised_tokens(torch.randn(*labels.shape, 64, device="cuda"), labels)
    lm_head = nn.Linear(64, 1000, bias=False, device="cuda")
    results = []
    for kernel in ("torch", "liger"):
        hidden = tokens.hidden.clone().requires_grad_()
        lm_head.zero_grad(set_to_none=True)
        loss = linear_cross_entropy(lm_head, hidden, tokens.targets, weights, kernel=kernel)
        loss.backward()
        results.append((loss.detach(), hidden.grad, lm_head.weight.grad))
    for ours, liger in zip(*results, strict=True):
        torch.testing.assert_close(liger, ours, rtol=1e-4, atol=1e-5)


def test_liger_kernel_is_refused_where_it_cannot_run():
    from ivl.errors import ConfigError
    from ivl.losses import check_loss_kernel

    check_loss_kernel("torch", torch.device("cpu"))
    with pytest.raises(ConfigError, match="loss.kernel=liger runs on CUDA only"):
        check_loss_kernel("liger", torch.device("cpu"))
