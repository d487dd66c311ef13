"""A user reward for tests/test_rl.py, loaded by dotted path: shorter answers score higher (varied on random weights,
so groups have a signal)."""


def length(prompt: str, answer: str, reference: dict) -> float:
    return 1.0 / (1.0 + len(answer))


def constant(prompt: str, answer: str, reference: dict) -> float:
    """The same score for every answer: every group has zero variance, so the policy loss teaches nothing."""
    return 1.0
