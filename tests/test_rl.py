"""`ivl rl` end to end on a tiny model: rollouts, the update, evaluation, checkpoints and an exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ivl.config import ConfigError, load_config
from ivl.data.checks import check_data
from ivl.data.samples import SampleBuilder, load_records
from ivl.data.shapes import write_split
from ivl.finetune.options import RLConfig
from ivl.finetune.rl import run_rl
from ivl.finetune.rollout import PromptDataset
from ivl.model.load import load_model_config, load_tokenizer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_shapes")
    write_split(root, "train", 8, 112, 112)
    write_split(root, "validation", 4, 112, 112)
    return root


def tiny_rl(shapes, out, *overrides):
    return load_config(RLConfig, None, [
        f"data.train={shapes / 'train.jsonl'}", f"data.validation={shapes / 'validation.jsonl'}", "data.max_tiles=1",
        "data.use_thumbnail=false", "model.dtype=float32", "adapter.dropout=0", "optim.lr=5e-3",
        "optim.warmup_ratio=0", "loop.max_steps=4", "loop.log_every=1", "loop.num_workers=0", "loop.batch_size=2",
        "rl.num_generations=3", "rl.max_new_tokens=6", "rl.temperature=1.5", "eval.max_new_tokens=6",
        "eval.batch_size=4", "rewards.weights={exact_match: 1.0, 'rl_reward:length': 1.0}",
        f"loop.output_dir={out}", *overrides,
    ])  # fmt: skip


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rl_trains_evaluates_and_saves(shapes, tmp_path):
    result = run_rl(tiny_rl(shapes, tmp_path))
    steps = [r for r in _records(tmp_path) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(0 <= r["zero_variance_groups"] <= 1 and r["answer_tokens"] >= 1 for r in steps)
    assert "eval_reward" in result.metrics and "eval_exact_match" in result.metrics
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("settings", [("loss.level=sequence", "rl.updates_per_batch=2", "loop.save_every=2"),
                                      ("loss.level=token", "loss.beta=0.1", "loop.grad_accum=2", "loop.save_every=2")])
def test_resume_equals_an_uninterrupted_run(shapes, tmp_path, settings):
    overrides = (*settings, "loop.keep_last=5", "data.validation=null")
    run_rl(tiny_rl(shapes, tmp_path, *overrides))
    uninterrupted = [r for r in _records(tmp_path) if "reward" in r]
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")  # a crash after step 2
    shutil.rmtree(tmp_path / "adapter")
    run_rl(tiny_rl(shapes, tmp_path, *overrides))
    resumed = [r for r in _records(tmp_path) if "reward" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "reward", "kl", "clipped"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in uninterrupted], abs=1e-6)
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name, tensor in weights.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-6)
    assert any(r["loss"] != 0 for r in uninterrupted)


def test_config_errors(shapes, tmp_path):
    with pytest.raises(ConfigError, match="multiple of rl.updates_per_batch"):
        tiny_rl(shapes, tmp_path, "rl.updates_per_batch=2", "loop.save_every=3")
    with pytest.raises(ConfigError, match="num_generations"):
        tiny_rl(shapes, tmp_path, "rl.num_generations=1")


def _prompt_rows(shapes, path, with_answer=True):
    """The shapes rows as RL prompt rows: the question only, the reference in an `answer` field."""
    rows = [json.loads(line) for line in (shapes / "train.jsonl").read_text().splitlines()]
    with path.open("w") as handle:
        for row in rows:
            reference = row["conversations"][1]["value"]
            prompt_row = {"image": str(shapes / row["image"]), "conversations": row["conversations"][:1]}
            handle.write(json.dumps({**prompt_row, **({"answer": reference} if with_answer else {})}) + "\n")
    return path


def test_prompt_rows_with_an_answer_field_pass_the_data_check_and_train(shapes, tmp_path):
    config = tiny_rl(shapes, tmp_path, f"data.train={_prompt_rows(shapes, tmp_path / 'rl.jsonl')}",
                     "loop.max_steps=1", "data.validation=null")  # fmt: skip
    builder = SampleBuilder(load_tokenizer(config.model), load_model_config(config.model), config.data)
    assert check_data(config.data.train, builder, progress=False).clean
    unanswered = check_data(_prompt_rows(shapes, tmp_path / "bare.jsonl", with_answer=False), builder, False)
    assert not unanswered.clean and "no assistant turn" in unanswered.bad_rows[0][1]
    first = PromptDataset(load_records(config.data.train), builder)[0]
    expected = json.loads((shapes / "train.jsonl").read_text().splitlines()[0])["conversations"][1]["value"]
    assert first["fields"]["answer"] == expected and "What" in first["question"]
    run_rl(config)
    assert [r["step"] for r in _records(tmp_path) if "reward" in r] == [1]


def test_rl_thinking_reaches_the_prompts(shapes, tmp_path):
    config = tiny_rl(shapes, tmp_path, "data.template=internvl3_5", "rl.thinking=true")
    builder = SampleBuilder(load_tokenizer(config.model), load_model_config(config.model), config.data)
    records = load_records(config.data.train)
    thinking = PromptDataset(records, builder, config.rl.thinking)[0]["input_ids"]
    assert thinking.tolist() == builder.build_prompt(records[0], True)["input_ids"].tolist()
    assert thinking.tolist() != PromptDataset(records, builder, False)[0]["input_ids"].tolist()


def test_a_second_rl_run_into_a_held_folder_refuses(shapes, tmp_path):
    """RL takes the same output-folder lock as SFT, MPO and distillation: a run into a folder another run holds stops
    in one line before loading anything."""
    from ivl.errors import OutputError
    from ivl.outputs import claim_output_dir

    with claim_output_dir(tmp_path / "out"):
        with pytest.raises(OutputError, match="pid "):
            run_rl(tiny_rl(shapes, tmp_path / "out"))
