"""Verifiable rewards for `ivl rl`: each scores one sampled answer in [0, 1] (a user's may use any range) against the
row's reference fields; the run's reward is their weighted sum (`rewards.weights` in the config).

Every reward is called as `reward(prompt, answer, reference)`:
- prompt: the question the answer replies to (the row's last user turn, image placeholders included);
- answer: the sampled text, as decoded (with its `<think> ... </think>` block if the model thought);
- reference: the row's fields besides its images and conversation; `answer` is the row's own `answer` field, else
  its last assistant reply.
Built-in rewards compare the *final* answer: the text inside `<answer> ... </answer>` if present, else what follows
the last `</think>`, else the whole text. A user reward is named by dotted path, `mypkg.rewards:score`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ivl.errors import ConfigError
from ivl.evaluate import normalise_answer

Reward = Callable[[str, str, dict[str, Any]], float]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# A choice letter standing alone: "B", "(B)", "B.", "B)", "answer: B", "the answer is B".
_LETTER = re.compile(r"(?:^|[\s(\[:])([A-Z])(?=$|[\s).\]:,])")
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)


def final_answer(text: str) -> str:
    """The part of a sampled answer that is compared with the reference (see the module docstring)."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    return text.rsplit("</think>", 1)[-1].strip()


def exact_match(prompt: str, answer: str, reference: dict[str, Any]) -> float:
    """1 if the final answer equals reference['answer'] up to case, spacing and surrounding punctuation."""
    return float(normalise_answer(final_answer(answer)) == normalise_answer(str(reference["answer"])))


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(prompt: str, answer: str, reference: dict[str, Any], tolerance: float = 1e-6) -> float:
    """1 if the last number of the final answer is within `tolerance` x max(1, |expected|) of the reference's."""
    expected, got = last_number(str(reference["answer"])), last_number(final_answer(answer))
    if expected is None or got is None:
        return 0.0
    return float(math.isclose(got, expected, rel_tol=0.0, abs_tol=tolerance * max(1.0, abs(expected))))


def choice_letter(text: str) -> str | None:
    """The last stand-alone capital letter of `text` ("(B)", "B.", "answer: B"), or None."""
    found = _LETTER.findall(text.strip())
    return found[-1] if found else None


def multiple_choice(prompt: str, answer: str, reference: dict[str, Any]) -> float:
    """1 if the final answer names the reference's option letter (reference 'B', 'B.' or '(B) a cat')."""
    expected = str(reference["answer"]).strip().lstrip("(")[:1].upper()
    return float(bool(expected) and choice_letter(final_answer(answer)) == expected)


def think_format(prompt: str, answer: str, reference: dict[str, Any]) -> float:
    """1 if the answer is a `<think> ... </think>` block followed by a non-empty answer (InternVL3.5's thinking mode),
    else 0."""
    return float(bool(_FORMAT.match(answer)))


BUILTIN: dict[str, Reward] = {
    "exact_match": exact_match,
    "numeric": numeric_match,
    "choice": multiple_choice,
    "format": think_format,
}


def load_user_reward(path: str) -> Reward:
    """`package.module:function` -> that function (it must be importable where the run starts)."""
    module_name, _, attribute = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"rewards.weights: cannot load reward {path!r}: {error}") from error
    if not callable(function):
        raise ConfigError(f"rewards.weights: {path!r} is not a function")
    return function


@dataclass
class WeightedReward:
    """The run's reward: sum of weight x reward over the configured rewards."""

    rewards: dict[str, Reward]
    weights: dict[str, float]

    def __call__(self, prompt: str, answer: str, reference: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """-> (the weighted sum, each reward's own score)."""
        scores = {name: float(reward(prompt, answer, reference)) for name, reward in self.rewards.items()}
        return sum(self.weights[name] * score for name, score in scores.items()), scores


def build_reward(weights: dict[str, float], numeric_tolerance: float = 1e-6) -> WeightedReward:
    """Names (built-in, or `module:function`) with their weights -> the run's reward."""
    if not weights:
        raise ConfigError("rewards.weights: name at least one reward, e.g. {exact_match: 1.0}")
    rewards: dict[str, Reward] = {}
    for name in weights:
        if ":" in name:
            rewards[name] = load_user_reward(name)
        elif name == "numeric":
            rewards[name] = partial(numeric_match, tolerance=numeric_tolerance)
        elif name in BUILTIN:
            rewards[name] = BUILTIN[name]
        else:
            known = ", ".join(BUILTIN)
            raise ConfigError(f"rewards.weights: unknown reward {name!r}; built-in: {known}, or module:function")
    return WeightedReward(rewards, dict(weights))
