"""`python -m RECIPE CONFIG.yaml [overrides]`, shared by every recipe module (what `accelerate launch -m` runs)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ivl.config import load_config
from ivl.errors import KNOWN_ERRORS


def recipe_main(module: str, config_class: type, run: Callable[[Any], dict[str, Any]], argv: list[str] | None) -> int:
    """Load the config, `run(config)`, report a known error in one line (exit 2), print the output on the main
    process."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(f"usage: python -m {module} CONFIG.yaml [section.key=value ...]", file=sys.stderr)
        return 2
    try:
        result = run(load_config(config_class, argv[0], argv[1:]))
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result["is_main_process"]:
        print(f"done: {result['output']}")
    return 0
