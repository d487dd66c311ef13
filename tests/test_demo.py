"""The demo job and its shipped base model (`ivl/assets/demo_base`)."""

from __future__ import annotations

import pytest

from ivl.data.samples import DataConfig, SampleBuilder
from ivl.data.shapes import make_description_sample, make_sample
from ivl.demo.pretrain import IMAGE_SIZE, demo_base_path
from ivl.evaluate import answer_question
from ivl.model.load import ModelConfig, load_model

pytestmark = pytest.mark.slow


def test_description_samples_name_what_is_in_the_scene():
    for index in range(40):
        sample = make_description_sample("validation", index, 64, 64)
        assert sample.question.startswith("Describe the ")
        described = sample.answer.split(", ")
        if sample.question == "Describe the image.":
            assert len(described) == len(sample.objects)
        for phrase in described:  # "a red circle at the top left": one object of the scene, article included
            article, color, shape, _, _, *quadrant = phrase.split(" ")
            assert article == ("an" if color == "orange" else "a")
            assert any(o.color == color and o.shape == shape for o in sample.objects), (sample.question, phrase)
    # Other images than the question task's: the two tasks' scenes come from different random streams.
    assert make_description_sample("train", 0, 64, 64).objects != make_sample("train", 0, 64, 64).objects


def test_place_descriptions_name_the_object_in_that_quadrant_and_leave_the_other_samples_alone():
    from ivl.data.shapes import PLACE_SHARE, QUADRANTS

    named = 0
    for index in range(200):
        sample = make_description_sample("train", index, 32, 32, places=True)
        plain = make_description_sample("train", index, 32, 32)
        assert sample.objects == plain.objects  # the same scene either way
        if sample.question.startswith("Describe the object at the "):
            named += 1
            (subject,) = [
                o for o in sample.objects if sample.question == f"Describe the object at the {QUADRANTS[o.quadrant]}."
            ]
            article = "an" if subject.color == "orange" else "a"
            where = QUADRANTS[subject.quadrant]
            assert sample.answer == f"{article} {subject.color} {subject.shape} at the {where}"
        else:
            assert (sample.question, sample.answer) == (plain.question, plain.answer)
    assert abs(named / 200 - PLACE_SHARE) < 0.1


def test_each_question_is_answered_by_its_scene_and_answers_are_balanced():
    from collections import Counter

    from ivl.data.shapes import QUADRANTS

    answers = {kind: Counter() for kind in ("color", "shape", "count", "position")}
    for index in range(800):
        sample = make_sample("train", index, 32, 32)
        objects, question = sample.objects, sample.question.split("\n")[0]
        assert len({o.shape for o in objects}) == len({o.color for o in objects}) == len(objects)  # names are unique
        if sample.kind == "count":
            assert question == "How many objects are there?" and sample.answer == str(len(objects))
        elif sample.kind == "position":
            (subject,) = [o for o in objects if question == f"Where is the {o.color} {o.shape}?"]
            assert sample.answer == QUADRANTS[subject.quadrant]
        else:
            (subject,) = [o for o in objects if question.endswith(f"the object at the {QUADRANTS[o.quadrant]}?")]
            assert sample.answer == getattr(subject, sample.kind)
        answers[sample.kind][sample.answer] += 1
    for kind, counts in answers.items():  # 200 questions per kind: every answer near its fair share (chance <= 1/4)
        share = 200 / len(counts)
        assert len(counts) == (6 if kind == "color" else 4)
        assert all(0.6 * share < n < 1.4 * share for n in counts.values()), (kind, counts)


def test_shipped_base_describes_scenes_but_does_not_give_short_answers(tmp_path):
    model, tokenizer = load_model(ModelConfig(name_or_path=str(demo_base_path()), dtype="float32"))
    builder = SampleBuilder(tokenizer, model.config, DataConfig(max_tiles=4, use_thumbnail=False))
    described, short = 0, 0
    for index in range(8):
        sample = make_description_sample("validation", index, IMAGE_SIZE, IMAGE_SIZE)
        image = tmp_path / f"describe-{index}.png"
        sample.image.save(image)
        described += answer_question(model, builder, f"<image>\n{sample.question}", [str(image)], 64) == sample.answer
        sample = make_sample("validation", index, IMAGE_SIZE, IMAGE_SIZE)
        sample.image.save(image)
        short += answer_question(model, builder, f"<image>\n{sample.question}", [str(image)], 16) == sample.answer
    assert described >= 7  # pre-trained: it sees the scene (a random-weight model describes none)
    assert short == 0  # never trained on the demo's questions: it answers with a description, not a word


def test_demo_runs_end_to_end_and_reports_before_and_after(tmp_path, capsys):
    from ivl.demo.run import run_demo

    result = run_demo(tmp_path, num_train=32, num_validation=8, overrides=["loop.max_steps=3", "loop.num_workers=0"])
    out = capsys.readouterr().out
    assert "validation exact-match after SFT" in out and "ivl chat --adapter" in out
    assert result["loss_after"] < result["loss_before"]
    assert result["exact_match_before"] == 0.0  # the base describes scenes; it has never given a short answer
    for name in ("run/model/model.safetensors", "run/metrics.jsonl", "run/loss.png"):
        assert (tmp_path / name).is_file(), name


def test_ivl_demo_takes_overrides_and_a_bad_one_is_one_line_before_any_work(tmp_path, capsys):
    from ivl.cli import main as cli_main

    assert cli_main(["demo", "--out-dir", str(tmp_path), "loop.cpu_threads=-1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "loop.cpu_threads must be >= 0" in error and "Traceback" not in error
    assert not (tmp_path / "data").exists()
