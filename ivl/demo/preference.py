"""Preference pairs from the shapes task (the MPO demo's data): the same scene and question as `shapes.make_sample`,
asked for a short reasoning; chosen = the scene described, then the correct answer; rejected = the same reasoning
ending in a wrong answer (another answer of the same kind), so the pair differs exactly where the answer is right or
wrong. Written as InternVL MPO jsonl (`image`, `question`, `chosen`, `rejected`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ivl.demo.shapes import ANSWER_SUFFIX, COLORS, QUADRANTS, SHAPES, SPLIT_SEEDS, describe, make_sample

REASONING_SUFFIX = "\nDescribe what you see, then answer."
# The answers a question of each kind can have: a wrong one is drawn from the same set.
ANSWERS = {"color": tuple(COLORS), "shape": SHAPES, "count": ("1", "2", "3", "4"), "position": QUADRANTS}


def preference_pair(split: str, index: int, width: int, height: int) -> tuple[dict, object]:
    """(row without its image path, the image) of pair `index`: deterministic, like the shapes samples."""
    sample = make_sample(split, index, width, height)
    rng = np.random.default_rng([SPLIT_SEEDS[split], index, 2])
    wrong = [answer for answer in ANSWERS[sample.kind] if answer != sample.answer]
    rejected = wrong[int(rng.integers(len(wrong)))]
    question = sample.question.removesuffix(ANSWER_SUFFIX) + REASONING_SUFFIX
    scene = describe(sample.objects)
    row = {
        "question": f"<image>\n{question}",
        "chosen": f"I see {scene}. Answer: {sample.answer}",
        "rejected": f"I see {scene}. Answer: {rejected}",
    }
    return row, sample.image


def write_preference_split(
    out_dir: str | Path, split: str, num_pairs: int, width: int = 448, height: int = 448
) -> Path:
    """Write images and `{split}_preference.jsonl` (image paths relative to `out_dir`); returns the jsonl."""
    out_dir = Path(out_dir)
    (out_dir / "images" / f"{split}_preference").mkdir(parents=True, exist_ok=True)
    annotation = out_dir / f"{split}_preference.jsonl"
    with annotation.open("w") as handle:
        for index in range(num_pairs):
            row, image = preference_pair(split, index, width, height)
            relative = f"images/{split}_preference/{index:06d}.png"
            image.save(out_dir / relative)
            handle.write(json.dumps({"id": f"{split}-{index}", "image": relative, **row}) + "\n")
    return annotation


def main(argv: list[str] | None = None) -> None:
    """`python -m ivl.demo.preference OUT_DIR [NUM_PAIRS]`: the MPO demo's data (train pairs, and the short-answer
    validation split for exact-match), at the demo's image size."""
    import sys

    from ivl.demo.pretrain import IMAGE_SIZE
    from ivl.demo.shapes import write_split

    argv = sys.argv[1:] if argv is None else argv
    out_dir, num_pairs = Path(argv[0]), int(argv[1]) if len(argv) > 1 else 1000
    print(write_preference_split(out_dir, "train", num_pairs, IMAGE_SIZE, IMAGE_SIZE))
    print(write_split(out_dir, "validation", 128, IMAGE_SIZE, IMAGE_SIZE))


if __name__ == "__main__":
    main()
