"""Distillation on tiny ViTs on CPU, measured end to end (configs/distill/tiny.yaml):

- the teacher: the `tiny-teacher` preset first trained for a minute to name the colour and shape of single-object
  shapes crops (a linear head on its mean-pooled last layer; samples disjoint from the probe sets), so that its
  features hold something a random network's do not (a random teacher's colour kNN accuracy is matched by a random
  student's), then saved and loaded back as a standalone HF-native checkpoint;
- online training: held-out per-token cosine to the teacher (patch, CLS) at the start and the end, and kNN /
  linear-probe accuracy (colour and shape of single-object shapes crops) of the teacher, the student at its random
  initialisation and the trained student;
- offline training from an fp32 cache (no PCA, no subsampling) against the online loss curve; cache sizes per tile for
  the compression options;
- CLIP initialisation: the student's cosine to a (random, tiny) CLIP with CLIP's pre-LayerNorm folded or dropped;
- the int8 teacher's (bitsandbytes, on CPU) and the bf16 teacher's distance to the fp32 one.

    python bench/distill_tiny.py [--steps 600] [--out bench/results_distill_tiny.json]

Prints a table and writes the JSON. The training images are 224 px shapes images cut into their four 112 px
quadrants plus a thumbnail (`data.max_tiles: 4`), the probe tiles are single objects' quadrants.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ivl.config import load_config
from ivl.data.shapes import COLORS, SHAPES
from ivl.distill.commands import run_cache
from ivl.distill.data import TileDataset, list_images
from ivl.distill.evaluate import pooled_features, probe_accuracies, probe_set
from ivl.distill.export import load_run
from ivl.distill.int8 import teacher_fidelity
from ivl.distill.models import build_vision_model, hidden_states, vision_config
from ivl.distill.student import build_student
from ivl.distill.teacher import TeacherConfig, load_teacher
from ivl.distill.train import DistillConfig, run_distill
from ivl.image import normalize
from ivl.runtime import read_metrics

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "distill" / "tiny.yaml"


def pretrain_teacher(out: Path, steps: int = 400, batch_size: int = 32) -> tuple[Path, float]:
    """Train the tiny teacher to classify colour and shape of single-object crops; returns (checkpoint, seconds)."""
    start = time.perf_counter()
    tiles, colors = probe_set("train", 2000, 112, "color", first_index=50_000)
    _, shapes = probe_set("train", 2000, 112, "shape", first_index=50_000)
    teacher = build_vision_model(vision_config("tiny-teacher"), seed=0)
    torch.manual_seed(0)  # the head's initialisation (torch's default seed is random per process)
    head = torch.nn.Linear(teacher.config.hidden_size, len(COLORS) + len(SHAPES))
    optimizer = torch.optim.AdamW([*teacher.parameters(), *head.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    teacher.train()
    for _ in range(steps):
        index = torch.randint(0, len(tiles), (batch_size,), generator=generator)
        last = teacher.config.num_hidden_layers - 1
        logits = head(hidden_states(teacher, normalize(tiles[index]), [last])[last][:, 1:].mean(dim=1))
        loss = F.cross_entropy(logits[:, : len(COLORS)], colors[index]) + F.cross_entropy(
            logits[:, len(COLORS) :], shapes[index]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.save_pretrained(out / "teacher")
    return out / "teacher", time.perf_counter() - start


def train_online(out: Path, steps: int, teacher: Path) -> tuple[DistillConfig, dict, float]:
    config = load_config(DistillConfig, CONFIG, [f"loop.output_dir={out / 'online'}", f"loop.max_steps={steps}",
                                                 f"cache.dir={out / 'cache'}", f"teacher.name_or_path={teacher}",
                                                 "loop.eval_every=100"])  # fmt: skip
    start = time.perf_counter()
    result = run_distill(config)
    return config, result, time.perf_counter() - start


def probes(config: DistillConfig, run_dir: Path) -> dict[str, dict[str, float]]:
    """kNN / linear-probe accuracy of teacher, random-init student and trained student, per label."""
    trained, info = load_run(run_dir)
    teacher = load_teacher(config.teacher, "cpu")
    initial = build_vision_model(config.student.vision_config(), config.student.init_seed)
    random_teacher = load_teacher(TeacherConfig(dtype="float32"), "cpu")  # the untrained tiny-teacher preset
    student_layer, teacher_layer = info["layer_pairs"][-1]
    networks = {"teacher": (teacher, teacher_layer), "random_teacher": (random_teacher, teacher_layer),
                "student_init": (initial, student_layer), "student": (trained.student, student_layer)}  # fmt: skip
    results = {}
    for label in ("color", "shape"):
        probe = config.eval
        train_tiles, train_labels = probe_set("train", probe.train_images, 112, label)
        test_tiles, test_labels = probe_set("validation", probe.test_images, 112, label)
        features = {
            name: tuple(pooled_features(net, t, layer, 64, "cpu") for t in (train_tiles, test_tiles))
            for name, (net, layer) in networks.items()
        }
        results[label] = probe_accuracies(features, (train_labels, test_labels), probe)
    return results


def offline_against_online(config: DistillConfig, out: Path, steps: int) -> dict:
    online_losses = [r["loss"] for r in read_metrics(out / "online" / "metrics.jsonl") if "loss" in r]
    cache = run_cache(config)
    offline = load_config(DistillConfig, CONFIG, [f"loop.output_dir={out / 'offline'}", f"loop.max_steps={steps}",
                                                  f"cache.dir={out / 'cache'}", "mode=offline", "loop.eval_every=100",
                                                  f"teacher.name_or_path={config.teacher.name_or_path}"])  # fmt: skip
    start = time.perf_counter()
    run_distill(offline)
    seconds = time.perf_counter() - start
    offline_losses = [r["loss"] for r in read_metrics(out / "offline" / "metrics.jsonl") if "loss" in r]
    difference = max(abs(a - b) for a, b in zip(online_losses, offline_losses, strict=True))
    return {"max_abs_loss_difference": difference, "logged_points": len(online_losses), "seconds": seconds,
            "fp32_feature_bytes_per_tile": cache["train"]["feature_bytes_per_tile"]}  # fmt: skip


def cache_sizes(out: Path, teacher: Path) -> dict[str, float]:
    sizes = {}
    for name, overrides in {
        "bfloat16": ["cache.dtype=bfloat16"],
        "float8": ["cache.dtype=float8_e4m3fn"],
        "pca16+tokens16+float8": ["cache.dtype=float8_e4m3fn", "cache.pca_dims=16", "cache.patch_tokens=16"],
    }.items():
        config = load_config(DistillConfig, CONFIG, [f"cache.dir={out / name}", "data.max_images=64",
                                                     "data.validation=", f"teacher.name_or_path={teacher}",
                                                     *overrides])  # fmt: skip
        sizes[name] = run_cache(config)["train"]["feature_bytes_per_tile"]
    return sizes


def clip_init(config: DistillConfig) -> dict[str, float]:
    data = config.data
    dataset = TileDataset(list_images(data.train, 8), 112, data)  # 8 images x 5 tiles
    calibration = torch.stack([dataset[i]["pixels"] for i in range(len(dataset))])
    results = {}
    for activation in ("gelu", "quick_gelu"):
        for pre_layernorm in ("fold", "drop"):
            student = load_config(type(config.student), None, ["preset=tiny-student", "init=clip",
                                  "clip=preset:tiny-clip", f"activation={activation}",
                                  f"pre_layernorm={pre_layernorm}"])  # fmt: skip
            results[f"{activation}/{pre_layernorm}"] = build_student(student, calibration)[1]["cosine_to_clip"]
    return results


def precision_fidelity(config: DistillConfig) -> dict[str, dict[int, float]]:
    """1 - per-token cosine to the fp32 teacher's hidden states, per layer, of the int8 and the bf16 teacher (so the
    int8 teacher's distance to a bf16 one is bounded by the two)."""
    pixels = normalize(torch.stack([TileDataset(list_images("shapes:validation", 16), 112, config.data)[i]["pixels"]
                                    for i in range(16)]))  # fmt: skip
    reference = load_teacher(config.teacher, "cpu")
    results = {}
    for name, dtype, quantize in (("int8", "float32", "int8"), ("bfloat16", "bfloat16", "none")):
        other = load_teacher(TeacherConfig(name_or_path=config.teacher.name_or_path, dtype=dtype,
                                           quantize=quantize), "cpu")  # fmt: skip
        fidelity = teacher_fidelity(reference, other, pixels, [0, 1, 2, 3])
        results[name] = {layer: 1 - cosine for layer, cosine in fidelity.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results_distill_tiny.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        out = Path(tmp)
        teacher, pretrain_seconds = pretrain_teacher(out)
        config, result, seconds = train_online(out, args.steps, teacher)
        evaluations = [r for r in read_metrics(out / "online" / "metrics.jsonl") if "eval_cosine_patch" in r]
        report = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "steps": args.steps,
            "teacher_pretrain_seconds": pretrain_seconds,
            "online_seconds": seconds,
            "tiles_per_second": result.metrics["tiles_per_second"],
            "heldout_cosine": {"start": evaluations[0], "end": evaluations[-1]},
            "heldout_cosine_curve": [(r["step"], r["eval_cosine_patch"], r["eval_cosine_cls"]) for r in evaluations],
            "probes": probes(config, out / "online"),
            "offline": offline_against_online(config, out, args.steps),
            "cache_feature_bytes_per_tile": cache_sizes(out, teacher),
            "clip_init_cosine": clip_init(config),
            "teacher_one_minus_cosine_to_fp32": precision_fidelity(config),
        }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {args.out}")


def print_table(report: dict) -> None:
    start, end = report["heldout_cosine"]["start"], report["heldout_cosine"]["end"]
    print(
        f"online, {report['steps']} steps, {report['online_seconds']:.0f} s ({report['tiles_per_second']:.0f} tiles/s)"
    )
    print(f"{'held-out cosine':<28} {'start':>8} {'end':>8}")
    for key, name in (("eval_cosine_patch", "patch tokens"), ("eval_cosine_cls", "CLS")):
        print(f"  {name:<26} {start[key]:>8.4f} {end[key]:>8.4f}")
    print("  by step (patch, CLS): " + ", ".join(f"{s}: {p:.3f} {c:.3f}" for s, p, c in report["heldout_cosine_curve"]))
    for label, accuracies in report["probes"].items():
        print(f"{'probe: ' + label:<28} {'kNN':>8} {'linear':>8}")
        for name in ("teacher", "random_teacher", "student_init", "student"):
            print(f"  {name:<26} {accuracies[name + '_knn']:>8.3f} {accuracies[name + '_linear_probe']:>8.3f}")
    offline = report["offline"]
    print(f"offline (fp32 cache) vs online: max |loss difference| {offline['max_abs_loss_difference']:.2e} over "
          f"{offline['logged_points']} logged steps")  # fmt: skip
    sizes = {"float32": offline["fp32_feature_bytes_per_tile"], **report["cache_feature_bytes_per_tile"]}
    print("cache bytes per tile: " + ", ".join(f"{name} {size:.0f}" for name, size in sizes.items()))
    print("cosine to CLIP at init: " + ", ".join(f"{k} {v:.4f}" for k, v in report["clip_init_cosine"].items()))
    for name, fidelity in report["teacher_one_minus_cosine_to_fp32"].items():
        values = ", ".join(f"{k}: {v:.1e}" for k, v in fidelity.items())
        print(f"{name} teacher vs fp32, 1 - per-token cosine by layer: {values}")


if __name__ == "__main__":
    main()
