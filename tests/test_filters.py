"""Repetition filters fire on the noise patterns of docs/design/data_filtering.md and stay quiet on normal answers."""

import pytest

from ivl.data.filters import repetition_flags


def test_clean_text_has_no_flags():
    assert repetition_flags("The invoice total is 1,250.00 EUR, due on 3 March.") == []
    assert repetition_flags("\n".join(f"Step {i}: add {i} apples." for i in range(10))) == []


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("Total: 0" + "0" * 40, "run of"),
        ("\n".join(["I am not sure."] * 6 + ["ok"]), "repeated lines"),
        ("the cat sat " * 20, "repetitive 3-gram 'the cat sat'"),
        ("x" * 10 + " word" * 7000, "abnormal length"),
    ],
)
def test_noise_patterns_are_flagged(text, flag):
    assert any(flag in found for found in repetition_flags(text))
