"""The RL rewards: built-ins on hand-written answers, user rewards by dotted path, weighted sums."""

from __future__ import annotations

import pytest

from ivl.errors import ConfigError
from ivl.finetune.rewards import (
    build_reward,
    exact_match,
    final_answer,
    multiple_choice,
    numeric_match,
    think_format,
)


def test_final_answer_prefers_answer_tags_then_text_after_think():
    assert final_answer("<think>maybe A</think> <answer> B </answer>") == "B"
    assert final_answer("<think>it is 3</think>\n\nfour") == "four"
    assert final_answer("plain") == "plain"
    assert final_answer("<answer>A</answer> no, wait: <answer>C</answer>") == "C"  # the last answer given counts


@pytest.mark.parametrize("answer,score", [("Top left.", 1.0), ("<think>hmm</think>\ntop  LEFT", 1.0),
                                          ("top right", 0.0), ("the top left", 0.0),
                                          ('"top left"', 1.0), ("'Top left!'", 1.0)])
def test_exact_match(answer, score):
    assert exact_match("where?", answer, {"answer": "top left"}) == score


@pytest.mark.parametrize("answer,score", [("There are 3 cats", 1.0), ("3.0", 1.0), ("about 1,000", 0.0),
                                          ("2 or 4", 0.0), ("no idea", 0.0), ("3.0000000001", 1.0)])
def test_numeric_match_with_tolerance(answer, score):
    assert numeric_match("how many?", answer, {"answer": "3"}) == score


def test_numeric_tolerance_is_relative_to_large_values():
    assert numeric_match("", "1,000", {"answer": "1005"}, tolerance=0.01) == 1.0
    assert numeric_match("", "1,000", {"answer": "1005"}, tolerance=0.001) == 0.0


@pytest.mark.parametrize("answer,score", [("B", 1.0), ("(B)", 1.0), ("The answer is B.", 1.0), ("answer: b", 0.0),
                                          ("A", 0.0), ("<think>A or B? B</think> C", 0.0), ("Because", 0.0)])
def test_multiple_choice_letter(answer, score):
    assert multiple_choice("which?", answer, {"answer": "(B) a cat"}) == score


@pytest.mark.parametrize("answer,score", [("<think>\nlook at it\n</think>\n\nB", 1.0),
                                          ("<think>\n\n</think>\n\nB", 1.0), ("B", 0.0),
                                          ("<think>no end B", 0.0), ("<think>x</think>   ", 0.0)])
def test_think_format(answer, score):
    assert think_format("", answer, {}) == score


def test_user_reward_by_dotted_path_gets_prompt_answer_and_reference(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompt, answer, reference):\n"
        "    return float(reference['colour'] in answer) + 0.5 * ('shape' in prompt)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward({"my_rewards:score": 2.0, "exact_match": 0.5})
    total, scores = reward("which shape?", "red", {"answer": "red", "colour": "red"})
    assert scores == {"my_rewards:score": 1.5, "exact_match": 1.0}
    assert total == 2.0 * 1.5 + 0.5 * 1.0


@pytest.mark.parametrize("weights,message", [({}, "at least one"), ({"exact": 1.0}, "unknown reward 'exact'"),
                                             ({"no_such_module:f": 1.0}, "cannot load reward")])
def test_bad_reward_names_are_config_errors(weights, message):
    with pytest.raises(ConfigError, match=message):
        build_reward(weights)


def test_numeric_tolerance_from_config_reaches_the_reward():
    reward = build_reward({"numeric": 1.0}, numeric_tolerance=0.1)
    assert reward("", "3.4", {"answer": "3"})[0] == 0.0  # tolerance 0.1 x 3
    assert reward("", "3.25", {"answer": "3"})[0] == 1.0
