"""The RL demo's data (configs/rl/demo.yaml; the commands are in its header): prompts of a question kind the SFT demo
never trained, "What shape is the red object?" (`shape_of_color`), which `ivl demo`'s model answers badly (0.22; mostly
"triangle", whatever the colour), mixed with the kinds it did train (rehearsal: their wrong answers are penalised too,
so RL on the new kind does not trade them away), and a held-out set of every kind, each row with its `kind` field, so
the run reports the held-out reward and exact-match of each kind: the gain on the new kind and any loss on the others.

The mix (`TRAIN_MIX`, prompts per prompt of the new kind) rehearses most the kinds RL on it disturbs: `shape` (the
same answers, asked by place) and `position` ("Where is the red circle?", the other kind that names an object by its
colour); `color` and `count`, which the SFT model answers almost always right (their groups mostly carry no
advantage), at half that. Measured on `ivl demo`'s model (docs/guides/rl.md, "The demo"): with the three new kinds
trained together and every SFT kind 1:1, `shape` lost 0.04-0.07 while `shape_of_color` gained 0.18-0.20; with this
mix (400 steps), `shape_of_color` gains 0.28 and no kind drops. The other two new kinds (`color_of_shape`,
`where_shape`) stay in the held-out set, untrained: `color_of_shape` stayed at 0.000 in every run that trained it
(the SFT models answer "What color is the circle?" with a count, so sampled answers are hardly ever right and the
groups carry no advantage), and both show whether RL on one kind moves its neighbours.

    python -m ivl.demo.rl OUT_DIR [--train N] [--validation N]     # N prompts of the new kind, N held-out per kind
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ivl.data.shapes import QUESTION_KINDS, RL_KINDS, write_kinds_split
from ivl.demo.pretrain import IMAGE_SIZE

TARGET_KIND = "shape_of_color"
TRAIN_MIX = {TARGET_KIND: 1.0, "shape": 1.0, "position": 1.0, "color": 0.5, "count": 0.5}


def write_rl_demo_data(out_dir: str | Path, num_train: int = 700, num_validation: int = 256) -> tuple[Path, Path]:
    """train.jsonl (`num_train` prompts of the new kind and `TRAIN_MIX` times as many of each SFT kind, from the SFT
    demo's training questions) and validation.jsonl (`num_validation` of every kind, the three new kinds included;
    the SFT kinds' questions are the SFT demo's own validation questions), at the demo's image size."""
    counts = {kind: max(1, round(num_train * share)) for kind, share in TRAIN_MIX.items()}
    train = write_kinds_split(out_dir, "train", counts, "train", IMAGE_SIZE, IMAGE_SIZE)
    held_out = {kind: num_validation for kind in (*RL_KINDS, *QUESTION_KINDS)}
    validation = write_kinds_split(out_dir, "validation", held_out, "validation", IMAGE_SIZE, IMAGE_SIZE)
    return train, validation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.demo.rl", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument(
        "--train", type=int, default=700, help="prompts of the new kind (TRAIN_MIX times as many of each SFT kind)"
    )
    parser.add_argument("--validation", type=int, default=256, help="held-out questions of each kind")
    args = parser.parse_args(argv)
    for path in write_rl_demo_data(args.out_dir, args.train, args.validation):
        print(path)


if __name__ == "__main__":
    main()
