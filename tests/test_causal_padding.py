"""Right-padded batches run causal attention without their padding mask (`ivl.model.forward.causal_inputs`): in a
causal LLM a real token never attends to the padding after it, so the hidden states, the loss and every gradient of
the real tokens are those of the masked forward, while sdpa takes its `is_causal` kernel (no [T, T] mask, no
expanded key / value heads). Checked per LLM family against the same forward with the mask, fp32, CPU."""

import pytest
import torch
from transformers import masking_utils

from ivl.data.chat import IGNORE_INDEX
from ivl.data.samples import collate
from ivl.evaluate import batch_supervised
from ivl.losses import supervised_tokens
from ivl.model.forward import causal_inputs, final_hidden_states
from ivl.model.load import ModelConfig, load_model
from ivl.model.parts import model_parts
from ivl.runtime import checkpoint_activations

LENGTHS = [13, 7, 10]  # a right-padded batch of three rows, the longest first; the last 4 tokens of each supervised


def _text_batch(vocab: int, pad: int, left: bool = False) -> dict:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for n in LENGTHS:
        input_ids = torch.randint(5, vocab, (n,), generator=generator)
        labels = torch.full((n,), IGNORE_INDEX)
        labels[-4:] = input_ids[-4:]
        samples.append({"input_ids": input_ids, "labels": labels, "tiles": None, "num_tiles": 0})
    batch = collate(samples, pad)
    if left:  # rows shifted to the right end, as generation pads
        for key, fill in (("input_ids", pad), ("labels", IGNORE_INDEX), ("attention_mask", 0), ("sample_tokens", 0)):
            for row, n in enumerate(LENGTHS):
                batch[key][row] = torch.cat([torch.full((max(LENGTHS) - n,), fill), batch[key][row, :n]])
    return batch


def _masks_built(monkeypatch) -> list[int]:
    """Counts the calls of transformers' sdpa / eager mask builders with a 2-D padding mask."""
    built = []
    for name in ("sdpa", "eager"):
        builder = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[name]

        def counting(*args, _builder=builder, **kwargs):
            built.append(int(kwargs.get("attention_mask") is not None))
            return _builder(*args, **kwargs)

        monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, counting)
    return built


def _hidden_and_grads(model, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    supervised = run()
    weights = torch.randn(supervised.hidden.shape, generator=torch.Generator().manual_seed(1))
    (supervised.hidden * weights).sum().backward()
    return supervised.hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# tiny-gpt-oss: eager attention with sinks and an 8-token sliding window on every other layer (rows of 10 and 13).
@pytest.mark.parametrize(
    "preset, checkpointed",
    [("tiny-112", False), ("tiny-112", True), ("tiny-qwen3", False), ("tiny-llama", False), ("tiny-gpt-oss", False)],
)
def test_right_padded_batch_without_its_mask_equals_the_masked_forward(preset, checkpointed, monkeypatch):
    model, tokenizer = load_model(ModelConfig(name_or_path=f"preset:{preset}", dtype="float32"))
    if checkpointed:
        checkpoint_activations(model_parts(model).llm)
    model.train()
    batch = _text_batch(model.config.text_config.vocab_size, tokenizer.pad_token_id)
    masked_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    masked = lambda: supervised_tokens(final_hidden_states(model, masked_inputs), batch["labels"])  # noqa: E731
    expected_hidden, expected_grads = _hidden_and_grads(model, masked)

    built = _masks_built(monkeypatch)
    hidden, grads = _hidden_and_grads(model, lambda: batch_supervised(model, batch, "cpu", torch.float32))
    assert built and not any(built)  # no padding mask reached transformers' mask builders
    assert (hidden - expected_hidden).abs().max() <= 1e-6 * expected_hidden.abs().max()
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        expected = expected_grads[name]
        assert (grad - expected).abs().max() <= 1e-6 * expected.abs().max(), name


def test_image_batch_logits_and_loss_on_real_tokens_equal_with_and_without_the_mask(shapes):
    from ivl.data.samples import SampleBuilder, SFTDataset, load_records, model_inputs
    from ivl.options import DataConfig

    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    builder = SampleBuilder(tokenizer, model.config, DataConfig(train=str(shapes / "train.jsonl"), max_tiles=2))
    dataset = SFTDataset(load_records(str(shapes / "train.jsonl")), builder)
    batch = collate([dataset[0], dataset[3], dataset[5]], tokenizer.pad_token_id)
    real = batch["attention_mask"].bool()
    assert not real.all()  # the rows differ in length: there is padding to leave unmasked
    inputs = model_inputs(batch)
    with torch.no_grad():
        masked = model(**inputs)
        unmasked = model(**causal_inputs(inputs, batch["attention_mask"]))
    assert (masked.logits[real] - unmasked.logits[real]).abs().max() <= 1e-6 * masked.logits[real].abs().max()

    def loss(logits: torch.Tensor) -> torch.Tensor:
        targets = batch["labels"][:, 1:].flatten()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets, ignore_index=IGNORE_INDEX)

    assert abs(loss(masked.logits) - loss(unmasked.logits)) <= 1e-6 * loss(masked.logits)


def test_left_padded_and_device_masks_are_kept():
    inputs = {"input_ids": torch.zeros(3, 13, dtype=torch.long), "attention_mask": torch.ones(3, 13)}
    right = _text_batch(100, 0)["attention_mask"]
    left = _text_batch(100, 0, left=True)["attention_mask"]
    assert "attention_mask" not in causal_inputs(inputs, right)
    assert causal_inputs(inputs, left) is inputs
    assert causal_inputs(inputs, right.to("meta")) is inputs  # finding out would make the host wait for the device
