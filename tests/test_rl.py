"""`ivl rl` end to end on a tiny model: rollouts, the update, evaluation, checkpoints and an exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ivl.config import ConfigError, load_config
from ivl.data.shapes import write_split
from ivl.finetune.options import RLConfig
from ivl.finetune.rl import run_rl


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
