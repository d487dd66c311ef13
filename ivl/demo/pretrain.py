"""Build the demo's shipped base model (`ivl/assets/demo_base/`): a tiny InternVL pre-trained on the shapes scenes.

A random-weight tiny InternVL does not learn the shapes questions in the demo's five minutes on two CPU cores (it sits
at chance for thousands of steps: bench/README.md, "demo learning"). A real user starts from a pre-trained InternVL
that already sees, and adapts it to their questions; the demo does the same. This script makes that base with the
kit's own SFT recipe (`ivl/assets/demo_pretrain.yaml`, full training of every part) on the `describe` task: the
whole scene or one object named by its colour or its shape (in the last run also by its quadrant), described in a
sentence ("a red circle at the top left"), on other images than the demo's. The base never sees the demo's
short-answer questions, so it scores ~0 exact-match on them before the demo fine-tunes it. Naming an object by its
quadrant ("Describe the object at the top left.", task `describe_places`) is what the demo's colour and shape
questions need ("What color is the object at the top left?"): without it the fine-tuned model learnt to find the object
at a place late and not in every run (0.54-0.89 exact-match, bench/README.md, "demo learning").

The shipped base was made in three runs on 2 CPU cores: two of ~17 min on the `describe` task (describe exact-match
0.74, then 0.90), then 1,500 steps with place descriptions mixed in (11 min on a busy machine, `OMP_NUM_THREADS=1`,
178 s user CPU; `describe_places` exact-match 0.93):

    python -m ivl.demo.pretrain --out /tmp/demo_base_1
    python -m ivl.demo.pretrain --out /tmp/demo_base_2 --train 20000 model.name_or_path=/tmp/demo_base_1 \
        loop.max_steps=5000 optim.lr=5e-4
    OMP_NUM_THREADS=1 python -m ivl.demo.pretrain --task describe_places model.name_or_path=/tmp/demo_base_2 \
        loop.max_steps=1500 optim.lr=5e-4
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from ivl.config import load_config
from ivl.data.shapes import write_dataset
from ivl.finetune.sft import SFTConfig, run_sft

IMAGE_SIZE = 224  # as the demo: 2x2 tiles of 112 px (data.max_tiles: 4), one quadrant of the scene per tile


def demo_base_path() -> Path:
    """Directory of the shipped demo base model (HF-native InternVL checkpoint + tokenizer)."""
    return Path(str(resources.files("ivl") / "assets" / "demo_base"))


def pretrain_config_path() -> Path:
    return Path(str(resources.files("ivl") / "assets" / "demo_pretrain.yaml"))


def pretrain(
    out_dir: str | Path, work_dir: str | Path, num_train: int, overrides: list[str] = (), task: str = "describe"
) -> dict:
    """Pre-train on the `describe` task and copy the final model to `out_dir`; returns the run's metrics.
    `overrides` go on top of the config, e.g. `model.name_or_path=DIR` to continue from an earlier base."""
    work_dir = Path(work_dir)
    data = work_dir / "data"
    write_dataset(data, num_train, 256, width=IMAGE_SIZE, height=IMAGE_SIZE, task=task)
    config = load_config(
        SFTConfig,
        pretrain_config_path(),
        [
            f"data.train={data / 'train.jsonl'}",
            f"data.validation={data / 'validation.jsonl'}",
            f"loop.output_dir={work_dir / 'run'}",
            *overrides,
        ],
    )
    result = run_sft(config)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(result.output, out_dir)
    summary = {k: result.metrics[k] for k in ("step", "loss", "eval_loss", "eval_exact_match") if k in result.metrics}
    # The run's own training info names temporary data paths; keep what describes how the model was made instead.
    info = {
        "built_by": "python -m ivl.demo.pretrain",
        "task": task,
        "train_samples": num_train,
        "overrides": list(overrides),
    }
    (out_dir / "ivl_training.json").write_text(json.dumps({**info, **summary}, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(demo_base_path()), help="where the base model goes")
    parser.add_argument("--train", type=int, default=10000, help="training samples of the describe task")
    parser.add_argument(
        "--task",
        default="describe",
        choices=("describe", "describe_places"),
        help="describe_places: a share of the descriptions name their object by its quadrant",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides of ivl/assets/demo_pretrain.yaml")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ivl-demo-pretrain-") as work_dir:
        summary = pretrain(args.out, work_dir, args.train, args.overrides, args.task)
    print(f"wrote {args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
