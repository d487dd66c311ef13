"""The RL demo (configs/rl/demo.yaml): its question kind, its data, the per-kind held-out metrics, and the config run
end to end for a few steps on the shipped demo base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ivl.config import load_config
from ivl.data.shapes import QUADRANTS, QUESTION_KINDS, RL_KINDS, make_kind_sample, make_sample
from ivl.demo.pretrain import demo_base_path
from ivl.demo.rl import write_rl_demo_data
from ivl.finetune.options import RLConfig
from ivl.finetune.rewards import build_reward
from ivl.finetune.rl import changes_since_start, run_rl
from ivl.finetune.rollout import eval_metrics, score_answers

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rl" / "demo.yaml"


def test_the_rl_kinds_name_an_object_by_one_attribute_and_ask_another():
    for index in range(40):
        sample = make_kind_sample("validation", index, "shape_of_color", 32, 32)
        color = sample.question.split("What shape is the ")[1].split(" object?")[0]
        assert [o.shape for o in sample.objects if o.color == color] == [sample.answer]
        sample = make_kind_sample("validation", index, "color_of_shape", 32, 32)
        shape = sample.question.split("What color is the ")[1].split("?")[0]
        assert [o.color for o in sample.objects if o.shape == shape] == [sample.answer]
        sample = make_kind_sample("validation", index, "where_shape", 32, 32)
        shape = sample.question.split("Where is the ")[1].split("?")[0]
        assert [QUADRANTS[o.quadrant] for o in sample.objects if o.shape == shape] == [sample.answer]
    # each new kind asks about other images than the others
    images = [make_kind_sample("train", 7, kind, 32, 32).image.tobytes() for kind in RL_KINDS]
    assert len(set(images)) == len(RL_KINDS)
    # The SFT kinds are the SFT demo's own questions: kind k's question i is make_sample's 4 i + k.
    for kind in QUESTION_KINDS:
        assert make_kind_sample("train", 5, kind, 32, 32).question == make_sample("train", 20 + QUESTION_KINDS.index(
            kind), 32, 32).question  # fmt: skip
    assert make_kind_sample("train", 3, "position", 32, 32).answer in QUADRANTS


def test_per_kind_held_out_metrics_on_a_hand_built_case():
    """Five answers of three kinds, reward = exact match + 0.5 x a length reward: every mean worked out by hand."""
    reward = build_reward({"exact_match": 1.0, "rl_reward:length": 0.5})
    fields = [{"answer": "red", "kind": "color"}, {"answer": "blue", "kind": "color"},
              {"answer": "2", "kind": "count"}, {"answer": "top left", "kind": "position"},
              {"answer": "circle"}]  # fmt: skip  (a row without the field: in the overall means only)
    answers = ["Red.", "green", "2", "top right", "circle"]
    groups = ["color", "count", "position"]
    totals = score_answers(["q"] * 5, fields, answers, reward, groups, "kind")
    metrics = eval_metrics(totals, groups)
    length = [1 / (1 + len(a)) for a in answers]
    assert metrics["eval_exact_match"] == pytest.approx(3 / 5)
    assert metrics["eval_reward"] == pytest.approx((3 + 0.5 * sum(length)) / 5)
    assert metrics["eval_exact_match/color"] == pytest.approx(1 / 2)
    assert metrics["eval_reward/color"] == pytest.approx((1 + 0.5 * (length[0] + length[1])) / 2)
    assert metrics["eval_exact_match/count"] == 1.0 and metrics["eval_reward/count"] == pytest.approx(1 + length[2] / 2)
    assert metrics["eval_exact_match/position"] == 0.0
    assert metrics["eval_reward/position"] == pytest.approx(length[3] / 2)
    changes = changes_since_start({"eval_reward/color": 0.25, "eval_reward": 0.5, "step": 0}, metrics)
    assert changes == pytest.approx({"eval_reward_change/color": metrics["eval_reward/color"] - 0.25,
                                     "eval_reward_change": metrics["eval_reward"] - 0.5})  # fmt: skip


@pytest.mark.slow
def test_the_demo_config_and_data_run_end_to_end(tmp_path):
    train, validation = write_rl_demo_data(tmp_path / "data", num_train=8, num_validation=2)
    rows = [json.loads(line) for line in validation.read_text().splitlines()]
    assert sorted(row["kind"] for row in rows) == sorted([*RL_KINDS, *QUESTION_KINDS] * 2)
    rows = [json.loads(line) for line in train.read_text().splitlines()]  # the new kind, SFT kinds by TRAIN_MIX
    counts = {"shape_of_color": 8, "shape": 8, "position": 8, "color": 4, "count": 4}
    assert sorted(row["kind"] for row in rows) == sorted(kind for kind, n in counts.items() for _ in range(n))
    config = load_config(RLConfig, CONFIG, [
        f"model.name_or_path={demo_base_path()}", f"data.train={train}", f"data.validation={validation}",
        f"loop.output_dir={tmp_path / 'run'}", "loop.max_steps=2", "loop.batch_size=2", "loop.log_every=1",
    ])  # fmt: skip
    result = run_rl(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evaluations] == [0, 2]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    for kind in (*RL_KINDS, *QUESTION_KINDS):
        assert f"eval_exact_match/{kind}" in result.metrics and f"eval_reward_change/{kind}" in result.metrics
    # Two questions of each kind: the overall mean is the mean of the kinds' means.
    kinds = [result.metrics[f"eval_exact_match/{kind}"] for kind in (*RL_KINDS, *QUESTION_KINDS)]
    assert result.metrics["eval_exact_match"] == pytest.approx(sum(kinds) / len(kinds))


def test_sampled_answers_never_hold_the_image_placeholder(tmp_path):
    """A policy drifting towards the image-context token (seen in the demo at a high learning rate) must not sample it:
    an answer holding it makes the update's forward find one image token more than image features, and stop."""
    import torch

    from ivl.data.samples import SampleBuilder, load_records
    from ivl.finetune.rollout import PromptDataset, collate_rl_prompts, repeat_groups, sample_answers
    from ivl.finetune.sampling import answer_seed
    from ivl.model.forward import output_layer
    from ivl.model.load import load_model

    train, _ = write_rl_demo_data(tmp_path, num_train=2, num_validation=0)
    config = load_config(RLConfig, CONFIG, [f"model.name_or_path={demo_base_path()}", f"data.train={train}",
                                            "data.validation=null"])  # fmt: skip
    model, tokenizer = load_model(config.model, torch.device("cpu"))
    image_token = model.config.image_token_id
    boost = output_layer(model).register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([image_token]), torch.full((*out.shape[:-1], 1), 50.0)))  # fmt: skip
    builder = SampleBuilder(tokenizer, model.config, config.data)
    dataset = PromptDataset(load_records(train), builder)
    batch = repeat_groups(collate_rl_prompts([dataset[0], dataset[1]], tokenizer.pad_token_id), 4)
    seeds = [answer_seed(0, 0, prompt, k) for prompt in range(2) for k in range(4)]
    completion = sample_answers(model, builder, batch, config.rl, torch.device("cpu"), torch.float32, seeds)
    boost.remove()
    assert completion.numel() > 0 and not (completion == image_token).any()
