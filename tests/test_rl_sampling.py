"""Keyed sampling for `ivl rl`: the draws follow the warped distribution (temperature, top-p) and a row's answer does
not depend on the rows it is batched with."""

from __future__ import annotations

import pytest
import torch

from ivl.config import load_config
from ivl.data.samples import SampleBuilder, load_records
from ivl.data.shapes import write_split
from ivl.finetune.options import RLConfig
from ivl.finetune.rollout import PromptDataset, collate_rl_prompts, repeat_groups, sample_answers
from ivl.finetune.sampling import answer_seed, sampling_processors
from ivl.model.load import load_model


def _frequencies(logits: torch.Tensor, temperature: float, top_p: float, draws: int) -> torch.Tensor:
    seeds = [answer_seed(0, 0, 0, k) for k in range(draws)]
    scores = sampling_processors(temperature, top_p, seeds)(None, logits.repeat(draws, 1))
    return torch.bincount(scores.argmax(-1), minlength=logits.shape[-1]).float() / draws


def test_keyed_draws_follow_the_tempered_distribution():
    """8,000 draws: each frequency within 0.02 of softmax(logits / T) (4.5 standard errors at p = 0.5)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    for temperature in (1.0, 1.7):
        expected = torch.softmax(logits[0] / temperature, -1)
        assert _frequencies(logits, temperature, 1.0, 8000) == pytest.approx(expected, abs=0.02)


def test_keyed_draws_follow_top_p():
    """top_p = 0.75 on probabilities (0.5, 0.3, 0.12, 0.08): the nucleus is the first two, renormalised."""
    logits = torch.tensor([[0.5, 0.3, 0.12, 0.08]]).log()
    frequencies = _frequencies(logits, 1.0, 0.75, 8000)
    assert frequencies[2:].tolist() == [0.0, 0.0]
    assert frequencies[:2] == pytest.approx(torch.tensor([0.625, 0.375]), abs=0.02)


def test_temperature_applies_before_top_p():
    """As `generate(do_sample=True)` orders them: logits (2, 1, 0) at T = 0.5 have probabilities (0.867, 0.117, 0.016),
    so top_p = 0.8 keeps the first token alone (top-p first would keep two: 0.665 < 0.8 at T = 1)."""
    frequencies = _frequencies(torch.tensor([[2.0, 1.0, 0.0]]), 0.5, 0.8, 2000)
    assert frequencies.tolist() == [1.0, 0.0, 0.0]


def test_answer_seeds_differ_per_key():
    keys = [(s, b, p, k) for s in (0, 1) for b in (0, 1) for p in (0, 1) for k in (0, 1)]
    assert len({answer_seed(*key) for key in keys}) == len(keys)


def test_an_answer_does_not_depend_on_the_rows_beside_it(tmp_path):
    """Answer k of each prompt sampled among all G rows equals the same answer sampled with only G/2 rows (one
    process's share of each group, as under 2 processes)."""
    write_split(tmp_path, "train", 2, 112, 112)
    config = load_config(RLConfig, None, [f"data.train={tmp_path / 'train.jsonl'}", "data.max_tiles=1",
                                          "data.use_thumbnail=false", "model.dtype=float32", "rl.max_new_tokens=8",
                                          "rl.temperature=1.5", "rl.top_p=0.95"])  # fmt: skip
    model, tokenizer = load_model(config.model)
    builder = SampleBuilder(tokenizer, model.config, config.data)
    prompts = PromptDataset(load_records(config.data.train), builder)
    batch = collate_rl_prompts([prompts[0], prompts[1]], tokenizer.pad_token_id)
    options, group = config.rl, 4

    def answers(ks: range) -> torch.Tensor:  # [2, len(ks), L]: answers ks of both prompts
        seeds = [answer_seed(0, 3, p, k) for p in range(2) for k in ks]
        rows = sample_answers(model, builder, repeat_groups(batch, len(ks)), options, torch.device("cpu"),
                              torch.float32, seeds)  # fmt: skip
        return rows.view(2, len(ks), -1)

    def padded(rows: torch.Tensor, length: int) -> torch.Tensor:  # a batch stops when all its rows have ended
        return torch.nn.functional.pad(rows, (0, length - rows.shape[-1]), value=tokenizer.pad_token_id)

    whole, halves = answers(range(group)), [answers(range(0, 2)), answers(range(2, 4))]
    length = max(rows.shape[-1] for rows in (whole, *halves))
    assert torch.equal(torch.cat([padded(half, length) for half in halves], dim=1), padded(whole, length))
    assert len({tuple(row.tolist()) for row in whole.view(2 * group, -1)}) > 2  # the answers differ
