"""`ivl rl` end to end on a tiny model: rollouts, the update, evaluation, checkpoints and an exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ivl.config import ConfigError, load_config
from ivl.data.checks import check_data
from ivl.data.samples import SampleBuilder, load_records
from ivl.data.shapes import write_split
from ivl.finetune.options import RLConfig
from ivl.finetune.rl import run_rl
from ivl.finetune.rollout import PromptDataset, answer_mask, answer_texts
from ivl.model.load import ModelConfig, load_model_config, load_tokenizer
from tests.helpers import torchrun


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_shapes")
    write_split(root, "train", 8, 112, 112)
    write_split(root, "validation", 4, 112, 112)
    return root


def tiny_overrides(shapes, out, *overrides):
    return [
        f"data.train={shapes / 'train.jsonl'}", f"data.validation={shapes / 'validation.jsonl'}", "data.max_tiles=1",
        "data.use_thumbnail=false", "model.dtype=float32", "adapter.dropout=0", "optim.lr=5e-3",
        "optim.warmup_ratio=0", "loop.max_steps=4", "loop.log_every=1", "loop.num_workers=0", "loop.batch_size=2",
        "rl.num_generations=3", "rl.max_new_tokens=6", "rl.temperature=1.5", "eval.max_new_tokens=6",
        "eval.batch_size=4", "rewards.weights={exact_match: 1.0, 'rl_reward:length': 1.0}",
        f"loop.output_dir={out}", *overrides,
    ]  # fmt: skip


def tiny_rl(shapes, out, *overrides):
    return load_config(RLConfig, None, tiny_overrides(shapes, out, *overrides))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rl_trains_evaluates_and_saves(shapes, tmp_path):
    result = run_rl(tiny_rl(shapes, tmp_path))
    steps = [r for r in _records(tmp_path) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(0 <= r["zero_variance_groups"] <= 1 and r["answer_tokens"] >= 1 for r in steps)
    assert not any("router_aux_loss" in r for r in steps)  # a dense LLM
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
    for option in ("data.packing=true", "data.padding_free=true"):  # options RL would otherwise ignore
        with pytest.raises(ConfigError, match=r"ivl rl does not pack"):
            tiny_rl(shapes, tmp_path, option, "loop.max_steps=2")


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


@pytest.mark.slow
def test_two_processes_with_half_groups_update_like_one_process(shapes, tmp_path):
    """2 CPU processes x G/2 answers == 1 process x G answers of the same prompts over 4 steps (2 generation batches
    of 2 updates, GRPO with KL): per-step loss, reward, KL, clipped and zero-variance shares at 1e-5, gradient norm at
    1e-5 relative, adapter weights at 1e-5. The answers are the same (keyed sampling); what remains is fp32 summation
    order (DDP adds two half-batch gradients where one process sums all rows at once): measured 3e-6 on the weights
    (|w| <= 1), 3e-8 on the losses. An error in the group statistics moves the weights by about the learning rate:
    normalising each process's half-group alone measured 2.5e-2 (and 2e-2 on the loss)."""
    settings = ("rl.num_generations=4", "loss.level=token", "loss.beta=0.1", "rl.updates_per_batch=2",
                "loop.save_every=2", "data.validation=null")  # fmt: skip
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    torchrun("-m", "ivl.finetune.rl", str(config), *tiny_overrides(shapes, tmp_path / "ddp", *settings),
             environment={"PYTHONPATH": str(Path(__file__).parent)})  # fmt: skip
    run_rl(tiny_rl(shapes, tmp_path / "one", *settings))
    one, ddp = ([r for r in _records(tmp_path / name) if "reward" in r] for name in ("one", "ddp"))
    assert [r["step"] for r in ddp] == [1, 2, 3, 4] and any(r["loss"] != 0 for r in one)
    for key in ("loss", "reward", "kl", "clipped", "zero_variance_groups", "answer_tokens"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in one], abs=1e-5), key
    # Adam hides a wrong loss scale in the weights (its steps do not depend on the gradient's scale); the norm does not
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in one], rel=1e-5)
    expected, got = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("one", "ddp"))
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_moe_llm_trains_on_its_routers_load_balancing_loss(shapes, tmp_path):
    """tiny-qwen3-moe with a constant reward: every group has zero variance, so the policy loss and its gradient are
    0 and only the routers' load-balancing loss can move the LoRA factors (lora_B starts at 0); it is logged."""
    run_rl(tiny_rl(shapes, tmp_path, "model.name_or_path=preset:tiny-qwen3-moe", "loop.max_steps=2",
                   "rewards.weights={'rl_reward:constant': 1.0}", "data.validation=null"))  # fmt: skip
    steps = [r for r in _records(tmp_path) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["zero_variance_groups"] == 1 and r["loss"] == 0 and r["router_aux_loss"] > 0 for r in steps)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in key and adapter[key].abs().sum() > 0 for key in adapter)


def test_rewards_see_each_answer_up_to_its_end_token_and_nothing_after():
    """Generation pads a finished answer's tail; what is scored stops at the end token (token 0 of the tail would
    decode as "!" in Qwen's vocabulary)."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path="preset:tiny"))
    words = tokenizer("red circle", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    completion = torch.tensor([[*words, end, tokenizer.pad_token_id, 0], [*words, 0, 0, 0]])
    mask = answer_mask(completion, [end])
    assert answer_texts(tokenizer, completion, mask) == ["red circle", "red circle!!!"]
