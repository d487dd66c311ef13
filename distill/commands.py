"""What `ivl distill cache | eval | export` do; `ivl.distill.cli` parses the command line (without torch) and imports
this module when one of them runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ivl.config import ConfigError
from ivl.distill.cache import PCA_FILE, feature_bytes_per_tile, write_cache
from ivl.distill.data import TileDataset, list_images
from ivl.distill.evaluate import heldout_cosine, pooled_features, probe_accuracies, probe_set
from ivl.distill.export import STUDENT_DIR, load_run, place_into_internvl
from ivl.distill.models import image_size_of
from ivl.distill.teacher import TeacherTargets, load_teacher
from ivl.distill.train import DistillConfig
from ivl.model.load import ModelConfig
from ivl.runtime import make_accelerator


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _progress(split: str):
    def report(done: int, total: int) -> None:
        # One line per shard in a log; on a terminal the next shard's line overwrites this one.
        last_or_log = done == total or not sys.stderr.isatty()
        print(f"{split}: shard {done}/{total}", end="\n" if last_or_log else "\r", file=sys.stderr, flush=True)

    return report


def run_cache(config: DistillConfig) -> dict[str, Any]:
    """Write the teacher's features of data.train (and data.validation) under cache.dir/{train,validation}."""
    if not config.cache.dir:
        raise ConfigError("cache.dir: say where to write the teacher's features")
    device = _device()
    teacher = load_teacher(config.teacher, device)
    vision = config.student.vision_config()
    tile = image_size_of(teacher.config)
    if tile != image_size_of(vision):
        raise ConfigError(f"student.image_size {image_size_of(vision)} != the teacher's {tile}")
    pairs = config.loss.layer_pairs(vision.num_hidden_layers, teacher.config.num_hidden_layers)
    layers = sorted({t for _, t in pairs})
    root, results = Path(config.cache.dir), {}
    splits = {"train": (config.data.train, config.data.max_images)}
    if config.data.validation:
        splits["validation"] = (config.data.validation, config.data.validation_images)
    for split, (spec, limit) in splits.items():
        dataset = TileDataset(list_images(spec, limit), tile, config.data)
        pca_from = root / "train" if split == "validation" and (root / "train" / PCA_FILE).is_file() else None
        manifest = write_cache(teacher, config.teacher.name_or_path, dataset, root / split, layers, config.cache,
                               device, pca_from, _progress(split))  # fmt: skip
        size = sum(f.stat().st_size for f in (root / split).glob("shard-*.safetensors"))
        results[split] = {"tiles": manifest["num_items"], "layers": layers, "bytes": size,
                          "feature_bytes_per_tile": feature_bytes_per_tile(root / split)}  # fmt: skip
    return results


def run_eval(config: DistillConfig) -> dict[str, Any]:
    """Held-out cosine to the teacher (data.validation) and kNN / linear-probe accuracy of student and teacher."""
    accelerator = make_accelerator(config.loop, torch.float32)
    device = accelerator.device
    run_dir = Path(config.eval.run_dir or config.loop.output_dir)
    model, info = load_run(run_dir)
    model.to(device)
    teacher = load_teacher(config.teacher, device)
    pairs = [tuple(pair) for pair in info["layer_pairs"]]
    tile = image_size_of(teacher.config)
    results: dict[str, Any] = {"run_dir": str(run_dir), "layer_pairs": pairs}
    if config.data.validation:
        dataset = TileDataset(list_images(config.data.validation, config.data.validation_images), tile, config.data)
        targets = TeacherTargets(teacher, [t for _, t in pairs])
        results.update(heldout_cosine(model, dataset, targets, config.loss, accelerator, config.eval.batch_size))
        results["eval_tiles"] = len(dataset)
    probe = config.eval
    train_tiles, train_labels = probe_set("train", probe.train_images, tile, probe.label)
    test_tiles, test_labels = probe_set("validation", probe.test_images, tile, probe.label)
    (student_layer, teacher_layer) = pairs[-1]
    features = {
        name: tuple(
            pooled_features(network, tiles, layer, probe.batch_size, device) for tiles in (train_tiles, test_tiles)
        )
        for name, network, layer in (("student", model.student, student_layer), ("teacher", teacher, teacher_layer))
    }
    results.update(probe_accuracies(features, (train_labels, test_labels), probe))
    results["probe"] = {"label": probe.label, "train_images": probe.train_images, "test_images": probe.test_images}
    return results


def print_eval(result: dict[str, Any]) -> None:
    if "eval_cosine_patch" in result:
        print(f"held-out cosine to the teacher ({result['eval_tiles']} tiles): "
              f"patch {result['eval_cosine_patch']:.4f}, CLS {result['eval_cosine_cls']:.4f}, "
              f"loss {result['eval_loss']:.4f}")  # fmt: skip
    label = result["probe"]["label"]
    print(f"{'probe (' + label + ')':<22} {'kNN':>8} {'linear':>8}")
    for name in ("student", "teacher"):
        print(f"{name:<22} {result[f'{name}_knn']:>8.3f} {result[f'{name}_linear_probe']:>8.3f}")


def export_student(run_dir: str, into: str, out: str) -> None:
    """A run's student (or its student/ directory) as the vision tower of InternVL model `into`, written to `out`."""
    student_dir = Path(run_dir)
    student_dir = student_dir if (student_dir / "config.json").is_file() else student_dir / STUDENT_DIR
    for note in place_into_internvl(student_dir, ModelConfig(name_or_path=into), out):
        print(f"note: {note}", file=sys.stderr)
