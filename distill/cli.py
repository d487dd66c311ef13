"""`ivl distill ...`: train, cache the teacher's features, evaluate, export.

    ivl distill CONFIG [section.key=value ...] [--show-config]   train (online, or offline with mode=offline)
    ivl distill cache CONFIG [section.key=value ...]             write the teacher's features to cache.dir
    ivl distill eval CONFIG [section.key=value ...] [--json]     cosine to the teacher, kNN / linear probe
    ivl distill export RUN_DIR --into MODEL --out DIR            the student as an InternVL model's vision tower

`ivl.cli` hands every argument after `distill` to `main` here and prints known errors in one line.
"""

from __future__ import annotations

import argparse
import json

from ivl.config import format_config, load_config
from ivl.distill.options import DistillConfig
from ivl.recipe import OptionsParser, print_result

SUBCOMMANDS = ("cache", "eval", "export")
CONFIG_OPTIONS = "ivl.distill.options:DistillConfig"


def build_parser() -> argparse.ArgumentParser:
    parser = OptionsParser(prog="ivl distill", description="Distil an InternViT teacher into a student.",
                           options_of=CONFIG_OPTIONS)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OptionsParser)
    for name, help_text in (("train", "train the student (the default: ivl distill CONFIG)"),
                            ("cache", "write the teacher's features to cache.dir (offline mode)"),
                            ("eval", "cosine to the teacher and kNN / linear-probe accuracy of a run")):  # fmt: skip
        command = commands.add_parser(name, help=help_text, options_of=CONFIG_OPTIONS)
        command.add_argument("config", help="YAML config (see configs/distill/)")
        command.add_argument("--show-config", action="store_true", help="print the resolved config first")
        command.add_argument("--json", action="store_true", help="print the result as JSON")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 mode=offline")
    export = commands.add_parser("export", help="put a run's student into an InternVL model as its vision tower")
    export.add_argument("run_dir", help="a distillation run's output directory (or its student/ directory)")
    export.add_argument("--into", required=True, help="the InternVL model: hub id, local path or preset:NAME")
    export.add_argument("--out", required=True, help="where to write the HF-native InternVL checkpoint")
    return parser


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "train"):
        argv.insert(0, "train")  # `ivl distill CONFIG` trains
    args = build_parser().parse_args(argv)
    if args.command == "export":
        from ivl.distill.commands import export_student

        export_student(args.run_dir, args.into, args.out)
        print(f"InternVL checkpoint with the student as its vision tower written to {args.out}")
        return 0
    config = load_config(DistillConfig, args.config, args.overrides)
    if args.show_config:
        print(format_config(config), end="")
    # The commands' modules import torch: only now, once the command line is parsed.
    if args.command == "train":
        from ivl.distill.train import run_distill

        print_result(run_distill(config))
    elif args.command == "cache":
        from ivl.distill.commands import run_cache

        print(json.dumps(run_cache(config), indent=2))
    else:
        from ivl.distill.commands import print_eval, run_eval

        result = run_eval(config)
        print(json.dumps(result, indent=2)) if args.json else print_eval(result)
    return 0
