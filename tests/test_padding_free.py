"""`data.padding_free`: a micro-batch's samples in one row, each attending only to itself, give the padded batch's
per-token log-probabilities, loss weights, gradients and training losses (fp32, CPU)."""

import json

import pytest
import torch

from ivl.config import ConfigError, load_config
from ivl.data.packing import collate_padding_free
from ivl.data.samples import DataConfig, SampleBuilder, SFTDataset, collate, load_records
from ivl.evaluate import batch_logps
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.losses import supervised_weights
from ivl.model.load import ModelConfig, load_model
from ivl.model.packed_attention import use_packed_attention
from tests.helpers import tiny_run


def test_padding_free_batch_gives_the_padded_batch_logps_weights_and_gradients(shapes):
    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    use_packed_attention(model, "sdpa")
    builder = SampleBuilder(tokenizer, model.config, DataConfig(train=str(shapes / "train.jsonl"), max_tiles=2))
    dataset = SFTDataset(load_records(str(shapes / "train.jsonl")), builder)
    samples = [dataset[i] for i in (0, 3, 5)]
    padded, free = collate(samples, tokenizer.pad_token_id), collate_padding_free(samples, tokenizer.pad_token_id)
    lengths = [len(sample["input_ids"]) for sample in samples]
    assert len(set(lengths)) > 1 and free["input_ids"].shape == (1, sum(lengths)) and bool(free["attention_mask"].all())

    results = []
    for batch in (padded, free):
        model.zero_grad()
        supervised, logps = batch_logps(model, batch, "cpu", torch.float32)
        weights = supervised_weights(batch["labels"], batch["sample_tokens"], "square")
        (logps * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((supervised.targets, logps.detach(), weights, grads))
    (targets, logps, weights, grads), (free_targets, free_logps, free_weights, free_grads) = results
    assert torch.equal(targets, free_targets) and torch.equal(weights, free_weights)
    torch.testing.assert_close(free_logps, logps, rtol=1e-5, atol=1e-5)
    assert grads.keys() == free_grads.keys()
    for name, grad in grads.items():  # fp32 sums in another order: equal to 1e-5 of the largest entry
        assert (free_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_skipped_rows_are_counted_as_collate_counts_them():
    sample = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "tiles": None,
              "num_tiles": []}  # fmt: skip
    batch = collate_padding_free([None, sample, None], pad_token_id=0)
    assert batch["num_skipped"] == 2 and batch["input_ids"].tolist() == [[5, 6, 7]]
    assert collate_padding_free([None], 0) == {"num_skipped": 1, "input_ids": None}


def test_sft_run_padding_free_gives_the_padded_runs_losses(shapes, tmp_path, monkeypatch):
    import ivl.finetune.sft

    rows = []  # the rows of every padding-free micro-batch the run trained on
    spy = lambda samples, pad_token_id: rows.append(len(samples)) or collate_padding_free(samples, pad_token_id)  # noqa: E731
    monkeypatch.setattr(ivl.finetune.sft, "collate_padding_free", spy)

    def losses(out, *overrides):
        config = load_config(SFTConfig, None, [*tiny_run(shapes), "loop.batch_size=4", f"loop.output_dir={out}",
                                               "optim.lr=1e-3", *overrides])  # fmt: skip
        run_sft(config)
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    padded = losses(tmp_path / "padded")
    assert not rows
    assert losses(tmp_path / "free", "data.padding_free=true") == pytest.approx(padded, abs=1e-5)
    assert rows and set(rows) == {4}  # 4 samples per micro-batch went into one row


def test_padding_free_with_packing_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="padding_free is for runs without packing"):
        load_config(DataConfig, None, ["packing=true", "padding_free=true"])
