"""Packing (docs/design/packing.md) and loss reductions (docs/design/loss_reweighting.md): budgets, splitting outside
images, isolation, resume, reductions."""

import json
import math
import random
import shutil

import pytest
import torch

from ivl.cli import main as cli_main
from ivl.config import ConfigError, load_config
from ivl.data.chat import IGNORE_INDEX, SampleError
from ivl.data.packed_loader import make_packer
from ivl.data.packing import PackBudget, Packer, collate_packs, image_spans, split_sample
from ivl.data.samples import DataConfig, SampleBuilder, SFTDataset, collate, load_records
from ivl.evaluate import batch_logps
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.losses import target_weights, weighted_nll
from ivl.model.load import ModelConfig, load_model

START, END, CONTEXT = 1, 2, 3


def synthetic(text_lengths: list[int], tiles: list[int], per_tile: int = 4) -> dict:
    """Text runs around images: text_lengths[i] tokens, then image i (if any); labels = ids on text, ignored on
    images; tiles hold their image's index so tests can see which tiles travelled where."""
    ids, tile_rows = [], []
    for index, length in enumerate(text_lengths):
        ids += [100 + index] * length
        if index < len(tiles):
            ids += [START] + [CONTEXT] * (per_tile * tiles[index]) + [END]
            tile_rows += [torch.full((3, 2, 2), index, dtype=torch.uint8)] * tiles[index]
    input_ids = torch.tensor(ids)
    labels = torch.where(input_ids >= 100, input_ids, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "tiles": torch.stack(tile_rows) if tile_rows else None,
        "num_tiles": list(tiles),
    }


def test_a_sample_over_a_budget_is_split_between_images_and_keeps_everything():
    sample = synthetic([5, 3, 7, 2], [2, 1, 3])  # images of 10, 6 and 14 tokens
    budget = PackBudget(max_tokens=20, max_tiles=3, buffer_size=4)
    pieces = split_sample(sample, budget, START, END)
    assert len(pieces) > 1
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces]), sample["input_ids"])
    assert torch.equal(torch.cat([p["labels"] for p in pieces]), sample["labels"])
    assert torch.equal(torch.cat([p["tiles"] for p in pieces if p["tiles"] is not None]), sample["tiles"])
    for piece in pieces:
        assert len(piece["input_ids"]) <= 20 and sum(piece["num_tiles"]) <= 3
        spans = image_spans(piece["input_ids"], START, END)  # raises on a cut inside <img>...</img>
        assert [end - start for start, end in spans] == [4 * n + 2 for n in piece["num_tiles"]]
        if piece["tiles"] is not None:  # each piece carries exactly its own images' tiles
            owners = [int(t[0, 0, 0]) for t in piece["tiles"]]
            assert len(owners) == sum(piece["num_tiles"])
    # The tile budget alone also splits: two 3-tile images never share a piece under max_tiles 3.
    two = split_sample(synthetic([1, 1], [3, 3]), PackBudget(1000, 3, 4), START, END)
    assert [p["num_tiles"] for p in two] == [[3], [3]]


def test_an_image_alone_over_a_budget_is_a_clear_sample_error():
    with pytest.raises(SampleError, match="does not fit a pack"):
        split_sample(synthetic([2, 2], [5]), PackBudget(max_tokens=12, max_tiles=8, buffer_size=4), START, END)
    with pytest.raises(SampleError, match=r"pack_max_tiles=2"):
        Packer(PackBudget(1000, 2, 4), START, END).add(0, synthetic([2, 2], [3]))


def _random_samples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [synthetic([rng.randint(2, 60), rng.randint(1, 20)], [rng.randint(1, 4)]) for _ in range(count)]


def _describe(packs) -> list[list[tuple[int, int]]]:
    return [[(item.position, item.piece) for item in pack] for pack in packs]


def test_packer_respects_both_budgets_a_bounded_buffer_and_packs_every_sample_once():
    budget = PackBudget(max_tokens=128, max_tiles=6, buffer_size=5)
    packer = Packer(budget, START, END)
    packs = []
    for position, sample in enumerate(_random_samples(200, seed=1)):
        packs += packer.add(position, sample)
        assert len(packer.buffer) <= budget.buffer_size
        assert packer.keys == sorted(packer.keys)
    packs += packer.flush()
    for pack in packs:
        assert sum(i.num_tokens for i in pack) <= 128 and sum(i.num_tiles for i in pack) <= 6
    assert sorted(position for pack in packs for position, _ in _describe([pack])[0]) == list(range(200))
    real = sum(i.num_tokens for pack in packs for i in pack)
    assert real / (len(packs) * 128) > 0.8  # it does pack (one sample per sequence would be ~0.3)


def test_an_entry_that_fills_both_budgets_exactly_is_merged_and_the_full_pack_emitted_at_once():
    budget = PackBudget(max_tokens=20, max_tiles=2, buffer_size=5)
    packer = Packer(budget, START, END)
    assert packer.add(0, synthetic([4], [1])) == []  # 10 tokens, 1 tile: waits in the buffer
    (pack,) = packer.add(1, synthetic([4], [1]))  # fits exactly beside it (10 + 10 tokens, 1 + 1 tiles)
    assert [item.position for item in pack] == [0, 1] and packer.buffer == []


def test_packer_state_restores_the_same_packs():
    samples = _random_samples(120, seed=2)
    budget = PackBudget(max_tokens=128, max_tiles=6, buffer_size=8)
    whole, packer = [], Packer(budget, START, END)
    for position, sample in enumerate(samples):
        whole += packer.add(position, sample)
    whole += packer.flush()
    first, packer = [], Packer(budget, START, END)
    for position, sample in enumerate(samples[:50]):
        first += packer.add(position, sample)
    state = json.loads(json.dumps(packer.state()))  # what a checkpoint keeps
    resumed = Packer(budget, START, END)
    resumed.restore(state, samples.__getitem__)
    rest = [pack for position in range(50, 120) for pack in resumed.add(position, samples[position])]
    assert _describe(first + rest + resumed.flush()) == _describe(whole)


def test_collated_packs_restart_positions_and_never_supervise_across_items():
    packer = Packer(PackBudget(100, 8, 4), START, END)
    a, b = synthetic([6, 4], [1]), synthetic([3, 5], [2])
    packs = packer.add(0, a) + packer.add(1, b) + packer.flush()
    batch = collate_packs(packs, pad_token_id=0)
    row = batch["position_ids"][0]
    assert row[: len(a["input_ids"])].tolist() == list(range(len(a["input_ids"])))
    assert row[len(a["input_ids"])] == 0
    assert batch["labels"][0, len(a["input_ids"])] == IGNORE_INDEX  # b's first token: nothing before it in b
    assert batch["tiles"].shape[0] == 3 and batch["num_tiles"] == [[1], [2]]
    assert set(batch["sample_tokens"][0].tolist()) == {9, 7}  # supervised targets: A 5 + 4, B 2 + 5


def test_the_three_reductions_match_hand_computed_values_also_split_and_packed():
    # Two samples: A with 2 supervised targets (CE 1 and 2), B with 1 (CE 4). w = 1 / x^p.
    labels = torch.tensor([[9, 5, 6, IGNORE_INDEX], [9, 7, IGNORE_INDEX, IGNORE_INDEX]])
    sample_tokens = torch.tensor([[2, 2, 2, 2], [1, 1, 0, 0]])
    logps = torch.tensor([-1.0, -2.0, -4.0])  # row-major order of the supervised targets
    expected = {
        "token": (1 + 2 + 4) / 3,
        "sample": ((1 + 2) / 2 + 4) / 2,
        "square": ((1 + 2) / math.sqrt(2) + 4) / (2 / math.sqrt(2) + 1),
    }
    for reduction, value in expected.items():
        weights = target_weights(labels, sample_tokens, reduction)
        supervised = weights[weights > 0]
        total = supervised.sum()
        assert weighted_nll(logps, supervised, total).item() == pytest.approx(value, rel=1e-6), reduction
        # Split over two micro-batches (or processes) with the step's global denominator: the same loss.
        split = weighted_nll(logps[:2], supervised[:2], total) + weighted_nll(logps[2:], supervised[2:], total)
        assert split.item() == pytest.approx(value, rel=1e-6), reduction
        # Packed: both samples in one row, each token carrying its own sample's count.
        packed_labels = torch.tensor([[9, 5, 6, 9, 7]])
        packed_counts = torch.tensor([[2, 2, 2, 1, 1]])
        packed_labels_isolated = packed_labels.clone()
        packed_labels_isolated[0, 3] = IGNORE_INDEX  # B's first token starts a sub-sample (as collate_packs sets)
        packed = target_weights(packed_labels_isolated, packed_counts, reduction)
        assert torch.allclose(packed[packed > 0], supervised)


@pytest.fixture(scope="module")
def tiny_setup(shapes):
    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    data = DataConfig(train=str(shapes / "train.jsonl"), max_tiles=1, use_thumbnail=False, packing=True,
                      pack_max_tokens=110, pack_max_tiles=4)  # fmt: skip
    builder = SampleBuilder(tokenizer, model.config, data)
    samples = [SFTDataset(load_records(data.train), builder)[i] for i in range(7)]
    return model, tokenizer, builder, samples


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_per_sample_losses_equal_unpacked_ones(tiny_setup, attention):
    model, tokenizer, builder, samples = tiny_setup
    model.config.text_config._attn_implementation = attention
    model.set_attn_implementation(attention)
    with torch.no_grad():
        alone = []
        for sample in samples:
            _, logps = batch_logps(model, collate([sample], tokenizer.pad_token_id), "cpu", torch.float32)
            alone.append(logps.sum().item())
        packer = make_packer(builder)
        packs = [pack for i, sample in enumerate(samples) for pack in packer.add(i, sample)] + packer.flush()
        assert max(len(pack) for pack in packs) > 1
        batch = collate_packs(packs, tokenizer.pad_token_id)
        supervised, logps = batch_logps(model, batch, "cpu", torch.float32)
        segments = batch["segment_ids"][supervised.rows, supervised.cols]
        positions = [item.position for pack in packs for item in pack]
        packed = {positions[s]: logps[segments == s].sum().item() for s in range(len(positions))}
        # Without isolation (a plain causal mask over the row) later sub-samples would see earlier ones.
        leaky = {key: value for key, value in batch.items() if key != "position_ids"}
        _, leaky_logps = batch_logps(model, leaky, "cpu", torch.float32)
    assert [packed[i] for i in range(len(samples))] == pytest.approx(alone, rel=1e-5)
    assert not torch.allclose(leaky_logps, logps, rtol=1e-4)


def test_bad_packing_configs_are_clear_config_errors(shapes, tiny_setup):
    with pytest.raises(ConfigError, match="pack_max_tiles: 4 cannot hold one image of max_tiles 6 \\+ thumbnail"):
        load_config(DataConfig, None, ["packing=true", "pack_max_tiles=4"])
    with pytest.raises(ConfigError, match="pack_buffer_size"):
        load_config(DataConfig, None, ["packing=true", "pack_buffer_size=0"])
    with pytest.raises(ConfigError, match="data.streaming: SFT streams through the packer"):
        load_config(SFTConfig, None, [f"data.train={shapes / 'train.jsonl'}", "data.streaming=true"])
    with pytest.raises(ConfigError, match="set loop.max_steps"):
        load_config(SFTConfig, None, [f"data.train={shapes / 'train.jsonl'}", "data.packing=true"])
    model, tokenizer, _, _ = tiny_setup
    small = load_config(DataConfig, None, ["packing=true", "pack_max_tokens=17", "max_tiles=1", "use_thumbnail=false"])
    with pytest.raises(ConfigError, match="pack_max_tokens: 17 cannot hold one image of data.max_tiles 1 \\(18 tokens"):
        make_packer(SampleBuilder(tokenizer, model.config, small))


@pytest.mark.slow
def test_cli_eval_gives_the_same_loss_with_packing_on_and_off(shapes, tmp_path, capsys):
    losses = {}
    for packing in (False, True):
        config = tmp_path / f"eval-{packing}.yaml"
        config.write_text(
            "model: {name_or_path: 'preset:tiny-112', dtype: float32}\n"
            f"data: {{validation: {shapes / 'validation.jsonl'}, max_tiles: 1, use_thumbnail: false, "
            f"packing: {str(packing).lower()}, pack_max_tokens: 150, pack_max_tiles: 4}}\n"
            "eval: {exact_match_samples: 0, batch_size: 2}\n"
        )
        capsys.readouterr()
        assert cli_main(["eval", str(config), "--json"]) == 0
        losses[packing] = json.loads(capsys.readouterr().out)
    assert losses[True]["tokens"] == losses[False]["tokens"] > 0
    assert losses[True]["loss"] == pytest.approx(losses[False]["loss"], rel=1e-5)


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_packed_resumed_run_reproduces_the_uninterrupted_losses(shapes, tmp_path, streaming):
    overrides = [f"data.train={shapes / 'train.jsonl'}", "data.max_tiles=1", "data.use_thumbnail=false",
                 "model.dtype=float32", "adapter.dropout=0", "optim.lr=5e-3", "optim.warmup_ratio=0",
                 "loop.max_steps=6", "loop.save_every=3", "loop.keep_last=5", "loop.log_every=1",
                 "loop.num_workers=0", "loop.batch_size=2", "data.packing=true", "data.pack_max_tokens=160",
                 "data.pack_max_tiles=4", "data.pack_buffer_size=3", "loss.reduction=square",
                 f"data.streaming={str(streaming).lower()}", f"loop.output_dir={tmp_path}"]  # fmt: skip
    run_sft(load_config(SFTConfig, None, overrides))
    uninterrupted = _losses(tmp_path)
    saved = json.loads((tmp_path / "checkpoints" / "step-000003" / "state.json").read_text())
    assert saved["packing_state"][0]["buffer"]  # the packer had unfinished packs to carry over
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "adapter")
    run_sft(load_config(SFTConfig, None, overrides))
    assert len(uninterrupted) == 6
    assert _losses(tmp_path) == pytest.approx(uninterrupted, abs=1e-6)
