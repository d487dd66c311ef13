"""The RL demo's data (configs/rl/demo.yaml; the commands are in its header): prompts of three question kinds the SFT
demo never trained (`shapes.RL_KINDS`: "What shape is the red object?", "What color is the circle?", "Where is the
circle?"), which `ivl demo`'s model answers badly, mixed 1:1 with the four kinds it did train (rehearsal: their wrong
answers are penalised too, so RL on the new kinds does not trade them away), and a held-out set of every kind, each row
with its `kind` field, so the run reports the held-out reward and exact-match of each kind: the gains on the new kinds
and any loss on the others.

Three new kinds rather than one: an SFT model answers them badly in different ways (often with the wrong kind of
answer: a position for a shape, a count for a place), and which of them it gets wrong varies from one SFT run to the
next (another thread count, another config), so the demo finds something to fix whatever `ivl demo` produced.

    python -m ivl.demo.rl OUT_DIR [--train N] [--validation N]     # N held-out questions of each kind
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ivl.data.shapes import QUESTION_KINDS, RL_KINDS, write_kinds_split
from ivl.demo.pretrain import IMAGE_SIZE


def write_rl_demo_data(out_dir: str | Path, num_train: int = 700, num_validation: int = 256) -> tuple[Path, Path]:
    """train.jsonl (`num_train` prompts of each of RL_KINDS and as many of the SFT kinds together, from the SFT demo's
    training questions) and validation.jsonl (`num_validation` of every kind; the SFT kinds' questions are the SFT
    demo's own validation questions), at the demo's image size."""
    new = {kind: num_train for kind in RL_KINDS}
    rehearsal = {kind: num_train * len(RL_KINDS) // len(QUESTION_KINDS) for kind in QUESTION_KINDS}
    train = write_kinds_split(out_dir, "train", {**new, **rehearsal}, "train", IMAGE_SIZE, IMAGE_SIZE)
    counts = {kind: num_validation for kind in (*RL_KINDS, *QUESTION_KINDS)}
    validation = write_kinds_split(out_dir, "validation", counts, "validation", IMAGE_SIZE, IMAGE_SIZE)
    return train, validation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.demo.rl", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=700, help="prompts of each new kind (as many of the SFT kinds)")
    parser.add_argument("--validation", type=int, default=256, help="held-out questions of each kind")
    args = parser.parse_args(argv)
    for path in write_rl_demo_data(args.out_dir, args.train, args.validation):
        print(path)


if __name__ == "__main__":
    main()
