"""Preference pairs from the shapes task (the MPO demo's data): the same scene and question as `shapes.make_sample`,
asked for a short reason before the answer; chosen = a one-clause reason about the object asked for, then the correct
answer ("The circle at the top left is purple. Answer: purple"); rejected = the same reason ending in a wrong answer
(another answer of the same kind), so the pair differs exactly where the answer is right or wrong. Written as
InternVL MPO jsonl (`image`, `question`, `chosen`, `rejected`).

The reason is one clause, not the whole scene: the pairs differ in one answer, and with a whole-scene description to
learn as well the preference signal drowned and short answers drifted towards descriptions (bench/README.md, MPO).
`write_reasoning_split` writes the same form as SFT rows, learnt before MPO (configs/mpo/demo_sft.yaml)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ivl.data.shapes import (
    ANSWER_SUFFIX,
    COLORS,
    QUADRANTS,
    SHAPES,
    SPLIT_SEEDS,
    ShapeObject,
    ShapesSample,
    make_sample,
)

REASONING_SUFFIX = "\nGive a short reason, then the answer."
# The answers a question of each kind can have: a wrong one is drawn from the same set.
ANSWERS = {"color": tuple(COLORS), "shape": SHAPES, "count": ("1", "2", "3", "4"), "position": QUADRANTS}


def _subject(sample: ShapesSample) -> ShapeObject:
    """The object the question asks about: named by its quadrant (colour, shape) or by colour and shape (position)."""
    if sample.kind == "position":
        return next(o for o in sample.objects if QUADRANTS[o.quadrant] == sample.answer)
    where = sample.question.split(" at the ")[1].split("?")[0]
    return next(o for o in sample.objects if QUADRANTS[o.quadrant] == where)


def _color_reason(sample: ShapesSample) -> str:
    subject = _subject(sample)
    return f"The {subject.shape} at the {QUADRANTS[subject.quadrant]} is {subject.color}."


def _shape_reason(sample: ShapesSample) -> str:
    subject = _subject(sample)
    return f"The {subject.color} object at the {QUADRANTS[subject.quadrant]} is a {subject.shape}."


def _count_reason(sample: ShapesSample) -> str:
    return f"I count {sample.answer} object{'' if sample.answer == '1' else 's'}."


def _position_reason(sample: ShapesSample) -> str:
    subject = _subject(sample)
    return f"The {subject.color} {subject.shape} is at the {sample.answer}."


REASONS: dict[str, Callable[[ShapesSample], str]] = {
    "color": _color_reason,
    "shape": _shape_reason,
    "count": _count_reason,
    "position": _position_reason,
}


def preference_pair(split: str, index: int, width: int, height: int) -> tuple[dict, object]:
    """(row without its image path, the image) of pair `index`: deterministic, like the shapes samples."""
    sample = make_sample(split, index, width, height)
    rng = np.random.default_rng([SPLIT_SEEDS[split], index, 2])
    wrong = [answer for answer in ANSWERS[sample.kind] if answer != sample.answer]
    rejected = wrong[int(rng.integers(len(wrong)))]
    row = {
        "question": f"<image>\n{reasoning_question(sample)}",
        "chosen": reasoned_answer(sample, sample.answer),
        "rejected": reasoned_answer(sample, rejected),
    }
    return row, sample.image


def reasoning_question(sample: ShapesSample) -> str:
    return sample.question.removesuffix(ANSWER_SUFFIX) + REASONING_SUFFIX


def reasoned_answer(sample: ShapesSample, answer: str) -> str:
    """The reason about the object asked for (always the true one), then `answer`."""
    return f"{REASONS[sample.kind](sample)} Answer: {answer}"


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


def write_reasoning_split(out_dir: str | Path, split: str, indices: range, width: int = 448, height: int = 448) -> Path:
    """Write SFT rows (InternVL jsonl, `{split}_reasoning.jsonl`) whose answers take the chosen form, a one-clause
    reason then the answer, for the shapes samples `indices`: what the SFT model learns before MPO, so the reference
    policy already answers in that form and MPO only has to prefer right answers to wrong ones."""
    out_dir = Path(out_dir)
    (out_dir / "images" / f"{split}_reasoning").mkdir(parents=True, exist_ok=True)
    annotation = out_dir / f"{split}_reasoning.jsonl"
    with annotation.open("w") as handle:
        for index in indices:
            sample = make_sample(split, index, width, height)
            relative = f"images/{split}_reasoning/{index:06d}.png"
            sample.image.save(out_dir / relative)
            turns = [{"from": "human", "value": f"<image>\n{reasoning_question(sample)}"},
                     {"from": "gpt", "value": reasoned_answer(sample, sample.answer)}]  # fmt: skip
            handle.write(json.dumps({"id": f"{split}-{index}", "image": relative, "conversations": turns}) + "\n")
    return annotation


def write_sft_meta(out_dir: str | Path, annotations: list[Path]) -> Path:
    """An InternVL meta file (`sft_meta.json`) that mixes the given jsonl files, each once per epoch."""
    out_dir = Path(out_dir)
    meta = {
        path.stem: {"root": str(out_dir.resolve()), "annotation": str(path.resolve()), "data_augment": False,
                    "repeat_time": 1, "length": len(path.read_text().splitlines())}
        for path in annotations
    }  # fmt: skip
    (out_dir / "sft_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir / "sft_meta.json"


def main(argv: list[str] | None = None) -> None:
    """`python -m ivl.demo.preference OUT_DIR [NUM_PAIRS]`, at the demo's image size: the MPO demo's data. Train pairs
    (samples 0..N-1); for the SFT step before MPO, `sft_meta.json` mixing short-answer rows (samples 0..N-1) and
    reason-then-answer rows (samples N..2N-1, other images than the pairs'); the short-answer validation split for
    exact-match."""
    import sys

    from ivl.data.shapes import write_split
    from ivl.demo.pretrain import IMAGE_SIZE

    argv = sys.argv[1:] if argv is None else argv
    out_dir, num_pairs = Path(argv[0]), int(argv[1]) if len(argv) > 1 else 1000
    print(write_preference_split(out_dir, "train", num_pairs, IMAGE_SIZE, IMAGE_SIZE))
    short = write_split(out_dir, "train", num_pairs, IMAGE_SIZE, IMAGE_SIZE)
    reasoning = write_reasoning_split(out_dir, "train", range(num_pairs, 2 * num_pairs), IMAGE_SIZE, IMAGE_SIZE)
    print(write_sft_meta(out_dir, [short, reasoning]))
    print(write_split(out_dir, "validation", 128, IMAGE_SIZE, IMAGE_SIZE))


if __name__ == "__main__":
    main()
