"""The synthetic shapes VQA task: the kit's built-in data for the demo, the tests and the benchmarks.

Images of coloured shapes, one object per quadrant at most, with short-answer questions about colour, shape, count and
position (task `vqa`): "What color is the object at the top left?", "What shape is the object at the bottom right?",
"How many objects are there?", "Where is the red circle?". Every sample is a pure function of (split, index): train and
validation use disjoint seeds, and sample i is the same whatever the number of samples asked for. Answers are balanced,
so chance accuracy is at most 1/4.

Task `describe` is what the shipped demo base model was pre-trained on (`ivl.demo.pretrain`): descriptions of the whole
scene, of the object of one colour or of the objects of one shape, on other images than the `vqa` task's; task
`describe_places`, its last pre-training run, also names objects by their quadrant ("Describe the object at the top
left.").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_KINDS = ("color", "shape", "count", "position")
# Kinds outside the `vqa` rotation, asked of the same scenes, that name an object by one attribute and ask another:
# "What shape is the red object?", "What color is the circle?", "Where is the circle?". The RL demo (`ivl.demo.rl`)
# trains on them; the SFT demo never asks them, so its model answers them badly, often with the wrong kind of answer
# (a position for a shape, a count for a place), and which of them it gets wrong varies from one SFT run to another.
RL_KINDS = ("shape_of_color", "color_of_shape", "where_shape")
TASKS = ("vqa", "describe", "describe_places")
PLACE_SHARE = 0.3  # task `describe_places`: the share of descriptions that name their object by its quadrant
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
SPLIT_SEEDS = {"train": 0, "validation": 1}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    quadrant: int  # index into QUADRANTS


@dataclass
class ShapesSample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    objects: list[ShapeObject]


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, width: int, height: int, rng: np.random.Generator) -> None:
    # Centre jittered inside the quadrant; radius well inside it so shapes never cross quadrant borders.
    cell_w, cell_h = width / 2, height / 2
    radius = min(cell_w, cell_h) * rng.uniform(0.22, 0.34)
    cx = (obj.quadrant % 2) * cell_w + cell_w / 2 + rng.uniform(-0.1, 0.1) * cell_w
    cy = (obj.quadrant // 2) * cell_h + cell_h / 2 + rng.uniform(-0.1, 0.1) * cell_h
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)


def render(objects: list[ShapeObject], width: int, height: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, width, height, rng)
    return image


def _pick(rng: np.random.Generator, options, count: int = 1) -> list:
    return [options[i] for i in rng.choice(len(options), size=count, replace=False)]


def _scene_and_question(rng: np.random.Generator, kind: str) -> tuple[list[ShapeObject], str, str]:
    """A scene of 1-4 objects (distinct shapes and colours, one per quadrant) and a question of `kind` about it: the
    colour or the shape of the object in a quadrant, how many objects there are, or where an object is; for RL_KINDS
    the shape of the object of a colour, the colour of a shape, or where a shape is. Every answer kind is balanced
    (colour 1/6, others 1/4 by chance)."""
    num_objects = int(rng.integers(1, 5))
    quadrants = [int(q) for q in rng.permutation(4)][:num_objects]
    shapes = _pick(rng, SHAPES, num_objects)
    colors = _pick(rng, list(COLORS), num_objects)
    objects = [ShapeObject(s, c, q) for s, c, q in zip(shapes, colors, quadrants, strict=True)]
    subject = objects[int(rng.integers(num_objects))]
    where = QUADRANTS[subject.quadrant]
    if kind == "color":
        return objects, f"What color is the object at the {where}?", subject.color
    if kind == "shape":
        return objects, f"What shape is the object at the {where}?", subject.shape
    if kind == "count":
        return objects, "How many objects are there?", str(num_objects)
    if kind == "shape_of_color":
        return objects, f"What shape is the {subject.color} object?", subject.shape
    if kind == "color_of_shape":
        return objects, f"What color is the {subject.shape}?", subject.color
    if kind == "where_shape":
        return objects, f"Where is the {subject.shape}?", where
    return objects, f"Where is the {subject.color} {subject.shape}?", where


def _attribute_scene_and_question(rng: np.random.Generator, kind: str) -> tuple[list[ShapeObject], str, str]:
    """The task's first question set, which names objects by an attribute ("What color is the circle?", "How many
    circles are there?"). A tiny model does not learn to answer it in the demo's five minutes (bench/README.md, "demo
    learning"); its scenes and text still make the `describe` task and the demo tokenizer, which were built from it.
    """
    quadrants = [int(q) for q in rng.permutation(4)]
    if kind == "count":
        target = _pick(rng, SHAPES)[0]
        count = int(rng.integers(1, 5))
        others = [s for s in SHAPES if s != target]
        num_others = int(rng.integers(0, 5 - count))
        shapes = [target] * count + [others[int(rng.integers(len(others)))] for _ in range(num_others)]
        colors = [_pick(rng, list(COLORS))[0] for _ in shapes]
        objects = [ShapeObject(s, c, q) for s, c, q in zip(shapes, colors, quadrants[: len(shapes)], strict=True)]
        return objects, f"How many {target}s are there?", str(count)
    # Distinct shapes and colours, so every object is named unambiguously by its shape or its colour.
    num_objects = int(rng.integers(1, 5))
    shapes = _pick(rng, SHAPES, num_objects)
    colors = _pick(rng, list(COLORS), num_objects)
    objects = [ShapeObject(s, c, q) for s, c, q in zip(shapes, colors, quadrants[: len(shapes)], strict=True)]
    subject = objects[int(rng.integers(num_objects))]
    if kind == "color":
        return objects, f"What color is the {subject.shape}?", subject.color
    if kind == "shape":
        return objects, f"What shape is the {subject.color} object?", subject.shape
    return objects, f"Where is the {subject.color} {subject.shape}?", QUADRANTS[subject.quadrant]


def make_sample(split: str, index: int, width: int = 448, height: int = 448) -> ShapesSample:
    """Sample `index` of `split` ('train' or 'validation'): deterministic and independent of other samples."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
    objects, question, answer = _scene_and_question(rng, kind)
    return ShapesSample(render(objects, width, height, rng), question + ANSWER_SUFFIX, answer, kind, objects)


def make_kind_sample(split: str, index: int, kind: str, width: int = 448, height: int = 448) -> ShapesSample:
    """Question `index` of `kind` in `split`: for a `vqa` kind the same sample as `make_sample` (every 4th index), for
    each of RL_KINDS a random stream of its own (other images)."""
    if kind in QUESTION_KINDS:
        return make_sample(split, QUESTION_KINDS.index(kind) + len(QUESTION_KINDS) * index, width, height)
    if kind not in RL_KINDS or split not in SPLIT_SEEDS:
        raise ValueError(f"kind must be one of {(*QUESTION_KINDS, *RL_KINDS)} and split one of {sorted(SPLIT_SEEDS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index, 3 + RL_KINDS.index(kind)])
    objects, question, answer = _scene_and_question(rng, kind)
    return ShapesSample(render(objects, width, height, rng), question + ANSWER_SUFFIX, answer, kind, objects)


def describe(objects: list[ShapeObject]) -> str:
    """The scene in words, objects in quadrant order: "a red circle at the top left, an orange square at the ..."."""
    return ", ".join(
        f"{_article(o.color)} {o.color} {o.shape} at the {QUADRANTS[o.quadrant]}"
        for o in sorted(objects, key=_quadrant)
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _quadrant(obj: ShapeObject) -> int:
    return obj.quadrant


def make_description_sample(
    split: str, index: int, width: int = 448, height: int = 448, places: bool = False
) -> ShapesSample:
    """Sample `index` of the `describe` task: "Describe the image." or a description of the objects named by one
    colour or one shape ("Describe the circles." where shapes repeat). Its own random stream: other images than
    `make_sample`'s. With `places` (task `describe_places`), a share of the samples (PLACE_SHARE, drawn from a stream
    of its own, so the other samples stay as they were) names its object by its quadrant instead ("Describe the
    object at the top left.")."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index, 1])
    scene_kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
    objects, _, _ = _attribute_scene_and_question(rng, scene_kind)
    image = render(objects, width, height, rng)
    if places and np.random.default_rng([SPLIT_SEEDS[split], index, 2]).random() < PLACE_SHARE:
        subject = objects[int(rng.integers(len(objects)))]
        question = f"Describe the object at the {QUADRANTS[subject.quadrant]}."
        return ShapesSample(image, question, describe([subject]), "describe", objects)
    target = int(rng.integers(2 if scene_kind == "count" else 3))
    if target == 0:
        return ShapesSample(image, "Describe the image.", describe(objects), "describe", objects)
    subject = objects[int(rng.integers(len(objects)))]
    if scene_kind == "count":  # shapes repeat here: all objects of the subject's shape
        named = [o for o in objects if o.shape == subject.shape]
        name = f"{subject.shape}s" if len(named) > 1 else subject.shape
    else:  # colours and shapes are distinct: exactly the subject
        named = [subject]
        name = f"{subject.color} object" if target == 1 else subject.shape
    return ShapesSample(image, f"Describe the {name}.", describe(named), "describe", objects)


def generate(
    split: str, num_samples: int, width: int = 448, height: int = 448, task: str = "vqa"
) -> Iterator[ShapesSample]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    for index in range(num_samples):
        if task == "vqa":
            yield make_sample(split, index, width, height)
        else:
            yield make_description_sample(split, index, width, height, places=task == "describe_places")


def write_split(
    out_dir: str | Path, split: str, num_samples: int, width: int = 448, height: int = 448, task: str = "vqa"
) -> Path:
    """Write images and an InternVL jsonl (`{split}.jsonl`, image paths relative to `out_dir`); returns the jsonl."""
    out_dir = Path(out_dir)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    annotation = out_dir / f"{split}.jsonl"
    with annotation.open("w") as handle:
        for index, sample in enumerate(generate(split, num_samples, width, height, task)):
            relative = f"images/{split}/{index:06d}.png"
            sample.image.save(out_dir / relative)
            row = {
                "id": f"{split}-{index}",
                "image": relative,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{sample.question}"},
                    {"from": "gpt", "value": sample.answer},
                ],
            }
            handle.write(json.dumps(row) + "\n")
    return annotation


def write_kinds_split(out_dir: str | Path, split: str, counts: dict[str, int], name: str, width: int = 448,
                      height: int = 448) -> Path:  # fmt: skip
    """Write `counts[kind]` questions of each kind (`make_kind_sample`, kinds interleaved) as `{name}.jsonl`, every row
    with its `kind` field (for per-kind evaluation), images under `images/{name}/`; returns the jsonl."""
    out_dir = Path(out_dir)
    (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
    order = sorted((index, kind) for kind, count in counts.items() for index in range(count))
    annotation = out_dir / f"{name}.jsonl"
    with annotation.open("w") as handle:
        for index, kind in order:
            sample = make_kind_sample(split, index, kind, width, height)
            relative = f"images/{name}/{kind}_{index:06d}.png"
            sample.image.save(out_dir / relative)
            turns = [{"from": "human", "value": f"<image>\n{sample.question}"}, {"from": "gpt", "value": sample.answer}]
            handle.write(json.dumps({"id": f"{split}-{kind}-{index}", "kind": kind, "image": relative,
                                     "conversations": turns}) + "\n")  # fmt: skip
    return annotation


def write_dataset(
    out_dir: str | Path,
    num_train: int = 512,
    num_validation: int = 128,
    width: int = 448,
    height: int = 448,
    task: str = "vqa",
) -> Path:
    """Write train / validation jsonl files and an InternVL meta file for both; returns the meta file's path."""
    out_dir = Path(out_dir)
    meta = {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        write_split(out_dir, split, count, width, height, task)
        meta[f"shapes_{split}"] = {
            "root": str(out_dir.resolve()),
            "annotation": str((out_dir / f"{split}.jsonl").resolve()),
            "data_augment": False,
            "repeat_time": 1,
            "length": count,
        }
    for split in ("train", "validation"):
        split_meta = {f"shapes_{split}": meta[f"shapes_{split}"]}
        (out_dir / f"meta_{split}.json").write_text(json.dumps(split_meta, indent=2) + "\n")
    return out_dir / "meta_train.json"


def training_text(num_samples: int = 400) -> list[str]:
    """Questions and answers of the task, used to train the shipped demo tokenizer."""
    lines = []
    for index in range(num_samples):
        rng = np.random.default_rng([SPLIT_SEEDS["train"], index])
        _, question, answer = _attribute_scene_and_question(rng, QUESTION_KINDS[index % len(QUESTION_KINDS)])
        lines.append(question + ANSWER_SUFFIX + "\n" + answer)
    lines.extend([*COLORS, *SHAPES, *QUADRANTS, "1", "2", "3", "4", "user", "assistant", "system"])
    return lines
