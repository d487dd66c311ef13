"""`python -m RECIPE CONFIG.yaml [overrides]`, shared by every recipe module (what `accelerate launch -m` runs), and
the one summary every way of launching a training run prints."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ivl.config import load_config
from ivl.errors import KNOWN_ERRORS

if TYPE_CHECKING:  # ivl.loop imports torch: `ivl --help` must not
    from ivl.loop import RunResult


def print_result(result: RunResult) -> None:
    """The run's JSON summary (output directory and last metrics), printed by the main process only."""
    if result.is_main_process:
        print(result.summary())


def recipe_main(module: str, config_class: type, run: Callable[[Any], RunResult], argv: list[str] | None) -> int:
    """Load the config, `run(config)`, report a known error in one line (exit 2), print the result's summary on the
    main process."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(f"usage: python -m {module} CONFIG.yaml [section.key=value ...]", file=sys.stderr)
        return 2
    try:
        print_result(run(load_config(config_class, argv[0], argv[1:])))
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
