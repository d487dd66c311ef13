"""`python -m RECIPE CONFIG.yaml [overrides]`, shared by every recipe module (what `accelerate launch -m` runs), and
the command-line pieces the CLI and the recipes share: `OptionsParser` (a --help that lists a config's options),
`load_object` (a "module:name" imported when it is needed) and `print_result` (the one summary every way of launching
a training run prints). Torch-free."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ivl.config import OPTIONS_HEADING, load_config, options_help
from ivl.errors import KNOWN_ERRORS

if TYPE_CHECKING:  # ivl.loop imports torch: `ivl --help` must not
    from ivl.loop import RunResult


def load_object(path: str) -> Any:
    """`"package.module:name"` -> that object, importing the module now (and only now)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class OptionsBlock:
    """One part of a --help's option list: the options of config class `config` ("module:Class"), only its top-level
    sections `only` when given, under `heading`."""

    config: str
    only: tuple[str, ...] = ()
    heading: str = OPTIONS_HEADING


class OptionsParser(argparse.ArgumentParser):
    """An ArgumentParser whose --help ends with every option of a config class (`options_of`, "module:Class"), or of
    several (`options_of`, a tuple of `OptionsBlock`: a command that takes more than one recipe's config). The
    configs' modules are imported when the help is printed, not before, so a command line with many recipes stays
    fast."""

    def __init__(self, *args: Any, options_of: str | tuple[OptionsBlock, ...] = "", **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.options_of = (OptionsBlock(options_of),) if isinstance(options_of, str) and options_of else options_of

    def format_help(self) -> str:
        if self.options_of:
            self.epilog = "\n\n".join(
                options_help(load_object(block.config), block.only, block.heading) for block in self.options_of
            )
        return super().format_help()


def print_result(result: RunResult) -> None:
    """The run's JSON summary (output directory and last metrics), printed by the main process only."""
    if result.is_main_process:
        print(result.summary())


def recipe_main(module: str, config_class: type, run: Callable[[Any], RunResult], argv: list[str] | None) -> int:
    """Load the config, `run(config)`, report a known error in one line (exit 2), print the result's summary on the
    main process. `--help` lists the config's options."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m {module} CONFIG.yaml [section.key=value ...]"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{options_help(config_class)}")
        return 0
    if not argv or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    try:
        print_result(run(load_config(config_class, argv[0], argv[1:])))
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
