"""`ivl <command>`: the kit's command line.

    ivl demo                                   the built-in default job on the synthetic shapes task
    ivl sft CONFIG [section.key=value ...]     supervised fine-tuning (LoRA / partial LoRA / QLoRA / full per part)
    ivl sft CONFIG --dry-run [--json]          parameter groups, learning rates, adapter layout, memory; no training
    ivl mpo CONFIG [section.key=value ...]     preference tuning (MPO: DPO + BCO with reward shift + SFT)
    ivl eval CONFIG [--adapter DIR] [--json]   validation loss and greedy exact-match
    ivl plan CONFIG [--device cuda|cpu] [--memory-gib 24] [--json]   predicted peak memory, itemised; fixes if too big
    ivl merge --adapter DIR --out DIR [--base B] [--format hf|original]   fold a LoRA / QLoRA adapter into its base
    ivl convert SRC DST --to hf|original       original InternVLChatModel checkpoint <-> HF-native
    ivl distill [cache|eval|export] ...        vision-encoder distillation (see distill/cli.py)
    ivl chat [--base B] [--adapter DIR] --image IMG "question"
    ivl data check PATH [--config CFG] [section.key=value ...] [--json] [--show-config]
    ivl data demo OUT_DIR [--train N] [--validation N]
    ivl presets                                the model presets (zoo shapes and tiny test models)

`ivl COMMAND --help` lists every config option of that command; `--show-config` prints the resolved config.
Known failures (bad config, bad data, unloadable model) end with a one-line `error:` message and exit code 2,
never a traceback; `ivl data check` exits 1 when any row is bad.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass

from ivl.config import format_config, load_config
from ivl.errors import KNOWN_ERRORS, ConfigError
from ivl.recipe import OptionsBlock, OptionsParser, load_object, print_result


@dataclass(frozen=True)
class Recipe:
    """A training recipe `ivl NAME CONFIG` runs: its config class and run function as "module:name". The config's
    module is torch-free (`ivl NAME --help` lists its options at once); the run's is imported only when it runs.
    Adding a recipe is one row in `RECIPES`."""

    config: str
    run: str
    help: str
    configs: str  # where its shipped configs are
    example: str  # an override, for the help
    dry_run: str = ""  # a module with dry_run(config) -> report and format_dry_run(report), if the recipe has one


RECIPES: dict[str, Recipe] = {
    "sft": Recipe("ivl.finetune.options:SFTConfig", "ivl.finetune.sft:run_sft",
                  "supervised fine-tuning from a YAML config", "configs/sft/", "optim.lr=1e-4 loop.max_steps=100",
                  dry_run="ivl.finetune.dry_run"),
    "mpo": Recipe("ivl.finetune.options:MPOConfig", "ivl.finetune.mpo:run_mpo",
                  "preference tuning (MPO) on chosen / rejected pairs from a YAML config", "configs/mpo/",
                  "mpo.beta=0.1 loop.max_steps=100"),
    "rl": Recipe("ivl.finetune.options:RLConfig", "ivl.finetune.rl:run_rl",
                 "online RL with verifiable rewards (GSPO / GRPO) from a YAML config", "configs/rl/",
                 "loss.level=token rl.num_generations=8"),
}  # fmt: skip


# `ivl plan` takes any recipe's config (recognised by its sections: `mpo:`, `rl:`, `teacher:`, else SFT): its --help
# lists the fine-tuning options once, then what MPO and RL add, then distillation's.
PLAN_OPTIONS = (
    OptionsBlock("ivl.finetune.options:SFTConfig", heading="options of an SFT config (keys of the YAML config, or on "
                 "the command line as section.key=value; MPO and RL configs have them too):"),
    OptionsBlock("ivl.finetune.options:MPOConfig", ("mpo",), "an MPO config adds:"),
    OptionsBlock("ivl.finetune.options:RLConfig", ("loss", "rl", "rewards", "eval"), "an RL config adds (its loss "
                 "and eval sections replace SFT's):"),
    OptionsBlock("ivl.distill.options:DistillConfig", heading="options of a distillation config:"),
)  # fmt: skip


def cmd_recipe(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.command]
    config = load_config(load_object(recipe.config), args.config, args.overrides)
    if args.show_config:
        print(format_config(config), end="")
    if getattr(args, "dry_run", False):
        module = importlib.import_module(recipe.dry_run)
        report = module.dry_run(config)
        print(json.dumps(report, indent=2) if args.json else module.format_dry_run(report))
        return 0
    print_result(load_object(recipe.run)(config))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ivl.evaluate import run_eval
    from ivl.options import EvalConfig

    overrides = args.overrides + ([f"eval.adapter={args.adapter}"] if args.adapter else [])
    config = load_config(EvalConfig, args.config, overrides, only=("model", "data", "eval"))
    result = run_eval(config)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
        return 0
    print(f"{result['data']}: loss {result['loss']:.4f} over {result['tokens']} supervised tokens")
    if "exact_match" in result:
        print(f"exact match {result['exact_match']:.3f} on {result['samples']} samples")
        for reference, answer in result["examples"]:
            print(f"  reference {reference!r:<24} answer {answer!r}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ivl.plan import plan_file
    from ivl.plan_proposals import format_plan

    plan = plan_file(args.config, args.overrides, args.device, args.memory_gib, speedups=True)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ivl.model.adapters import merge_adapter
    from ivl.options import ModelConfig

    base = ModelConfig(name_or_path=args.base) if args.base else None
    out, notes = merge_adapter(args.adapter, args.out, base, out_format=args.format)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    loads_with = {"hf": "InternVLForConditionalGeneration.from_pretrained", "original": "InternVL's remote code"}
    print(f"merged {args.format} checkpoint written to {out} (loads with {loads_with[args.format]})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ivl.model.convert import convert_checkpoint

    notes = convert_checkpoint(
        args.src,
        args.dst,
        to=args.to,
        allow_pickle=args.allow_pickle,
        llm_arch=args.llm_arch,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{args.to} checkpoint written to {args.dst}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from ivl.distill.cli import main as distill_main

    return distill_main(args.args)


def cmd_chat(args: argparse.Namespace) -> int:
    from ivl.data.samples import SampleBuilder
    from ivl.evaluate import answer_question
    from ivl.model.adapters import load_trained
    from ivl.model.load import load_model
    from ivl.model.parts import unwrap
    from ivl.options import DataConfig, ModelConfig

    if not (args.base or args.adapter):
        raise ConfigError("give --base (a model), --adapter (a run's adapter/ or model/ directory), or both")
    base = ModelConfig(name_or_path=args.base) if args.base else None
    if args.adapter:
        model, tokenizer, info = load_trained(args.adapter, base)
        data = {k: v for k, v in info.get("data", {}).items() if k in ("template", "max_tiles", "use_thumbnail")}
    else:
        (model, tokenizer), data = load_model(base), {}
    builder = SampleBuilder(tokenizer, unwrap(model).config, DataConfig(**data))
    question = " ".join(args.question)
    print(answer_question(model, builder, question, args.image, args.max_new_tokens, thinking=args.thinking))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ivl.data.checks import check_data
    from ivl.data.samples import SampleBuilder
    from ivl.model.load import load_model_config, load_tokenizer
    from ivl.options import DataCheckConfig

    config = load_config(DataCheckConfig, args.config, args.overrides, only=("model", "data"))
    if args.show_config:
        print(format_config(config), end="")
    builder = SampleBuilder(load_tokenizer(config.model), load_model_config(config.model), config.data)
    if not args.json:
        print(
            f"model {config.model.name_or_path}: {builder.tile_size} px tiles, {builder.tokens_per_tile} tokens per "
            f"tile, max {config.data.max_tiles} tiles, max_length {config.data.max_length}, "
            f"template {builder.tokenize.template.name}"
        )
    report = check_data(args.path, builder, progress=not args.json and sys.stderr.isatty())
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0 if report.clean else 1


def cmd_data_demo(args: argparse.Namespace) -> int:
    from ivl.data.shapes import write_dataset

    meta = write_dataset(args.out_dir, args.train, args.validation, args.width, args.height)
    print(f"wrote {args.train} train / {args.validation} validation samples; meta file {meta}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ivl.demo.run import run_demo

    run_demo(args.out_dir, overrides=args.overrides)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    import torch
    from transformers import InternVLForConditionalGeneration

    from ivl.model.presets import TINY, ZOO, preset_config

    print(f"{'preset':<28} {'vision':<16} {'llm':<16} {'parameters':>11}")
    for name, (vision, llm, _) in ZOO.items():
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(preset_config(name))
        billions = sum(p.numel() for p in model.parameters()) / 1e9
        print(f"{name:<28} {vision:<16} {llm:<16} {billions:>10.2f}B")
    print(f"tiny presets (random weights, demo tokenizer): {', '.join(TINY)}")
    print("use as model.name_or_path=preset:NAME")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OptionsParser(
        prog="ivl",
        description="Adapt InternVL models on one GPU.",
        epilog="`ivl COMMAND --help` lists the command's options (for sft, mpo, rl, eval, plan, distill and data "
        "check: every config key with its type, default and help).",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OptionsParser)

    demo = commands.add_parser("demo", help="run the built-in default job on the synthetic shapes task")
    demo.add_argument("--out-dir", default="outputs/demo")
    demo.add_argument(
        "overrides", nargs="*", help="dotted overrides of ivl/assets/demo_sft.yaml, e.g. loop.cpu_threads=2"
    )
    demo.set_defaults(handler=cmd_demo)

    for name, recipe in RECIPES.items():
        command = commands.add_parser(name, help=recipe.help, options_of=recipe.config)
        command.add_argument("config", help=f"YAML config (see {recipe.configs})")
        command.add_argument("--show-config", action="store_true", help="print the resolved config (with help) first")
        if recipe.dry_run:
            command.add_argument(
                "--dry-run", action="store_true", help="show parameter groups, LRs, adapter layout, memory; no training"
            )
            command.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")
        command.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {recipe.example}")
        command.set_defaults(handler=cmd_recipe)

    evaluate = commands.add_parser(
        "eval", help="validation loss and greedy exact-match of a model or adapter", options_of="ivl.options:EvalConfig"
    )
    evaluate.add_argument("config", help="YAML config with model / data / eval sections (an SFT config works)")
    evaluate.add_argument("--adapter", help="a run's adapter/ or model/ directory")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.exact_match_samples=100")
    evaluate.set_defaults(handler=cmd_eval)

    plan = commands.add_parser("plan", help="predict a run's peak memory, itemised, and what makes it fit",
                               options_of=PLAN_OPTIONS)  # fmt: skip
    plan.add_argument("config", help="an SFT, MPO, RL or distillation YAML config")
    plan.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="where the run would train (default %(default)s)"
    )
    plan.add_argument(
        "--memory-gib", type=float, default=24.0, help="memory of the card (or RAM) in GiB (float, default %(default)s)"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=4096")
    plan.set_defaults(handler=cmd_plan)

    merge = commands.add_parser("merge", help="merge a LoRA / QLoRA adapter into its base (not partial LoRA)")
    merge.add_argument("--adapter", required=True, help="a run's adapter/ directory")
    merge.add_argument("--out", required=True, help="where to write the merged HF-native checkpoint")
    merge.add_argument("--base", help="the base model (default: the one recorded at training time)")
    merge.add_argument("--format", choices=("hf", "original"), default="hf", help="checkpoint layout to write")
    merge.set_defaults(handler=cmd_merge)

    convert = commands.add_parser("convert", help="convert original InternVLChatModel <-> HF-native checkpoints")
    convert.add_argument("src", help="checkpoint directory to convert")
    convert.add_argument("dst", help="new directory for the converted checkpoint")
    convert.add_argument("--to", required=True, choices=("hf", "original"), help="layout to write")
    convert.add_argument("--allow-pickle", action="store_true", help="read pytorch_model*.bin (trusted files only)")
    convert.add_argument(
        "--llm-arch",
        choices=("qwen2", "llama", "phi3", "internlm2"),
        help="--to original: the original's LLM (default: as converted from, else internlm2 for a LLaMA-structured "
        "LLM with InternLM2's image token id 92546)",
    )
    convert.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard (GiB)")
    convert.set_defaults(handler=cmd_convert)

    # Everything after `distill` goes to ivl.distill.cli, which has its own sub-commands (and its own --help).
    # prefix_chars: options such as --help or --json are not this parser's, they are passed on as they are.
    distill = commands.add_parser(
        "distill", add_help=False, prefix_chars="+", help="vision-encoder distillation: train | cache | eval | export"
    )
    distill.add_argument("args", nargs=argparse.REMAINDER)
    distill.set_defaults(handler=cmd_distill)

    chat = commands.add_parser("chat", help="answer one question about an image")
    chat.add_argument("--base", help="hub id, local path or preset:NAME (default: an adapter's recorded base)")
    chat.add_argument("--adapter", help="a run's adapter/ or model/ directory")
    chat.add_argument("--image", action="append", default=[], help="an image path (repeat for several)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument(
        "--thinking",
        action="store_true",
        help="reason in <think>...</think> before answering (InternVL3.5: the thinking system prompt); without it, "
        "thinking-mode templates answer directly (empty think block)",
    )
    chat.add_argument("question", nargs="+")
    chat.set_defaults(handler=cmd_chat)

    data = commands.add_parser("data", help="check or generate data").add_subparsers(
        dest="data_command", required=True, parser_class=OptionsParser
    )
    check = data.add_parser(
        "check",
        help="validate every row of a jsonl / meta file / HF dataset and report",
        options_of="ivl.options:DataCheckConfig",
    )
    check.add_argument("path", help="InternVL jsonl, meta .json, or HF dataset")
    check.add_argument("--config", help="a recipe config: its model and data sections are used")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--show-config", action="store_true", help="print the resolved model and data config first")
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=8192")
    check.set_defaults(handler=cmd_data_check)
    make = data.add_parser("demo", help="write the synthetic shapes task (images, jsonl, meta files)")
    make.add_argument("out_dir")
    make.add_argument("--train", type=int, default=512)
    make.add_argument("--validation", type=int, default=128)
    make.add_argument("--width", type=int, default=448)
    make.add_argument("--height", type=int, default=336)
    make.set_defaults(handler=cmd_data_demo)

    presets = commands.add_parser("presets", help="list the model presets")
    presets.set_defaults(handler=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Dotted overrides may come before or after options (`PATH --json data.max_tiles=6`): argparse stops collecting
    # positionals at the first option, so the rest arrive here as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return args.handler(args)
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
