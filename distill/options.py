"""The distillation recipe's config sections (`ivl distill`): teacher, student, loss, data, cache, probes, each option
declared once with its help (`option(default, "help")`, see `ivl.config`).

Torch-free like `ivl.options`, so `ivl distill --help` answers at once; a method that needs the ViT presets or
`transformers` imports them when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ivl.config import option, section
from ivl.errors import ConfigError
from ivl.options import LoopConfig, OptimConfig

SHAPES_PREFIX = "shapes:"


@dataclass
class TeacherConfig:
    """Which InternViT teaches, and in what precision."""

    name_or_path: str = option("preset:tiny-teacher", "hub id, local directory (any InternVL layout) or preset:NAME")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", "the teacher's dtype; auto: bfloat16 on a bf16 GPU, else float32"
    )
    quantize: Literal["none", "int8"] = option("none", "int8: bitsandbytes LLM.int8() linear layers")
    init_seed: int = option(0, "random weights of a preset teacher only")

    def validate(self) -> None:
        from ivl.distill.models import VIT_PRESETS, preset_of

        name = preset_of(self.name_or_path)
        if name is not None and name not in VIT_PRESETS:
            raise ConfigError(f"name_or_path: unknown ViT preset {name!r}; known: {', '.join(VIT_PRESETS)}")


@dataclass
class StudentConfig:
    """The student's shape and initialisation."""

    preset: str = option("internvit-300m", "the student's ViT preset: internvit-300m, tiny-student, ...")
    image_size: int = option(0, "tile size; 0: the preset's (448 for the real presets); must equal the teacher's")
    activation: Literal["gelu", "quick_gelu"] = option("gelu", "InternViT-300M uses gelu, CLIP quick_gelu")
    init: Literal["scratch", "clip"] = option("scratch", "random weights, or a CLIP ViT's (student.clip)")
    clip: str = option("", "init=clip: a CLIPVisionModel checkpoint (openai/clip-vit-large-patch14-336, a path)")
    pre_layernorm: Literal["fold", "drop"] = option("fold", "CLIP's pre-LayerNorm: folded into the next layer, or off")
    calibration_tiles: int = option(32, "training tiles that fold the pre-LayerNorm and report the cosine to CLIP")
    gradient_checkpointing: bool = option(False, "recompute the student's activations in the backward pass")
    init_seed: int = option(0, "random weights: scratch init, the parts CLIP lacks, the adaptors")

    def validate(self) -> None:
        from ivl.distill.models import VIT_PRESETS

        if self.preset not in VIT_PRESETS:
            raise ConfigError(f"preset: unknown ViT preset {self.preset!r}; known: {', '.join(VIT_PRESETS)}")
        if self.init == "clip" and not self.clip:
            raise ConfigError("init=clip needs clip: a CLIPVisionModel checkpoint (openai/clip-vit-large-patch14-336)")
        if self.calibration_tiles < 1:
            raise ConfigError("calibration_tiles must be >= 1")

    def vision_config(self) -> Any:
        """The student's `InternVLVisionConfig`."""
        from ivl.distill.models import vision_config

        overrides: dict[str, Any] = {"hidden_act": self.activation}
        if self.image_size:
            overrides["image_size"] = self.image_size
        return vision_config(self.preset, **overrides)


@dataclass
class LossConfig:
    """Which layers are matched and how the terms are weighted."""

    last_k: int = option(1, "match the last K student layers with the last K teacher layers, in order")
    pairs: list[list[int]] = option(help="explicit [student, teacher] layer pairs (override last_k)", factory=list)
    cosine_weight: float = option(1.0, "weight of 1 - cosine similarity")
    smooth_l1_weight: float = option(0.0, "weight of the smooth-L1 distance")
    smooth_l1_beta: float = option(1.0, "smooth-L1's switch from quadratic to linear")
    patch_weight: float = option(1.0, "weight of the mean over patch tokens")
    cls_weight: float = option(1.0, "weight of the CLS token")

    def validate(self) -> None:
        if self.last_k < 1:
            raise ConfigError(f"last_k must be >= 1, got {self.last_k}")
        if any(len(pair) != 2 for pair in self.pairs):
            raise ConfigError(f"pairs: each entry is [student_layer, teacher_layer], got {self.pairs}")
        weights = (self.cosine_weight, self.smooth_l1_weight, self.patch_weight, self.cls_weight)
        if min(weights) < 0 or self.cosine_weight + self.smooth_l1_weight == 0:
            raise ConfigError("loss weights must be >= 0 with cosine_weight or smooth_l1_weight positive")
        if self.patch_weight + self.cls_weight == 0:
            raise ConfigError("patch_weight and cls_weight cannot both be 0")
        if self.smooth_l1_beta <= 0:
            raise ConfigError("smooth_l1_beta must be positive")

    def layer_pairs(self, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        """(student, teacher) layer pairs, 0-based."""
        from ivl.distill.models import resolve_layer

        pairs = self.pairs or [[-k, -k] for k in range(self.last_k, 0, -1)]
        return [(resolve_layer(s, student_layers, "loss.pairs (student)"),
                 resolve_layer(t, teacher_layers, "loss.pairs (teacher)")) for s, t in pairs]  # fmt: skip


@dataclass
class DistillDataConfig:
    """Where the training and held-out images come from, and how they become tiles."""

    train: str = option("shapes:train", "a folder of images, an InternVL jsonl / meta .json, or shapes:train")
    validation: str = option("", "held-out images for the cosine to the teacher (same forms); empty: no evaluation")
    max_images: int = option(0, "training images used (0: all; shapes: how many to generate)")
    validation_images: int = option(0, "held-out images used (0: all; shapes: how many to generate)")
    shapes_size: int = option(448, "width and height of generated shapes images")
    max_tiles: int = option(1, "tiles per image (dynamic tiling); 1: each image resized to one tile")
    use_thumbnail: bool = option(True, "with max_tiles > 1: also the thumbnail tile")

    def validate(self) -> None:
        for key, spec, count in (("train", self.train, self.max_images),
                                 ("validation", self.validation, self.validation_images)):  # fmt: skip
            if spec.startswith(SHAPES_PREFIX) and count < 1:
                count_key = "max_images" if key == "train" else "validation_images"
                raise ConfigError(f"{key}={spec}: say how many shapes images to generate ({count_key}=N)")
        if not self.train:
            raise ConfigError("train: give a folder of images, an InternVL jsonl / meta .json, or shapes:train")
        if self.max_tiles < 1 or self.shapes_size < 1:
            raise ConfigError("max_tiles and shapes_size must be >= 1")


@dataclass
class CacheConfig:
    """`ivl distill cache` settings; offline training reads `dir`."""

    dir: str = option("", "where the teacher's features are written (cache) and read (mode=offline)")
    dtype: Literal["float32", "bfloat16", "float16", "float8_e4m3fn"] = option("bfloat16", "stored features' dtype")
    pca_dims: int = option(0, "project each layer's tokens onto its top-d principal components; 0: full width")
    pca_fit_tiles: int = option(256, "tiles (the first ones) whose tokens fit the PCA")
    patch_tokens: int = option(0, "patch tokens kept per tile, drawn at random per tile (0: all); CLS always kept")
    shard_tiles: int = option(256, "tiles per cache shard file")
    batch_size: int = option(8, "tiles per teacher forward pass")
    seed: int = option(0, "which patch tokens are kept (patch_tokens > 0)")
    store_pixels: bool = option(True, "store the tiles too; false: offline training cuts them again from the images")

    def validate(self) -> None:
        for name in ("pca_dims", "patch_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in ("pca_fit_tiles", "shard_tiles", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")


@dataclass
class ProbeConfig:
    """Evaluation: the held-out cosine (during training too) and `ivl distill eval`'s labelled probe sets."""

    run_dir: str = option("", "a distillation run's output (student/, adaptors.safetensors); empty: loop.output_dir")
    label: Literal["color", "shape"] = option("color", "what the probes predict for single-object shapes images")
    train_images: int = option(240, "labelled probe-training images (shapes train split)")
    test_images: int = option(120, "probe-test images (shapes validation split)")
    k: int = option(10, "kNN neighbours (cosine similarity, similarity-weighted vote)")
    probe_steps: int = option(100, "L-BFGS iterations of the linear probe")
    batch_size: int = option(32, "tiles per forward pass in evaluation (held-out cosine, probe features)")

    def validate(self) -> None:
        if min(self.train_images, self.test_images, self.k, self.probe_steps, self.batch_size) < 1:
            raise ConfigError("train_images, test_images, k, probe_steps and batch_size must be >= 1")


@dataclass
class DistillConfig:
    """`ivl distill`: an InternViT teacher's features distilled into a smaller student ViT."""

    mode: Literal["online", "offline"] = option("online", "offline: teacher features from cache.dir (distill cache)")
    teacher: TeacherConfig = section(TeacherConfig)
    student: StudentConfig = section(StudentConfig)
    loss: LossConfig = section(LossConfig)
    data: DistillDataConfig = section(DistillDataConfig)
    cache: CacheConfig = section(CacheConfig)
    optim: OptimConfig = section(OptimConfig)
    loop: LoopConfig = section(LoopConfig)
    eval: ProbeConfig = section(ProbeConfig)

    def validate(self) -> None:
        if self.mode == "offline" and not self.cache.dir:
            raise ConfigError("mode=offline reads the teacher's features from cache.dir: set it and run "
                              "`ivl distill cache CONFIG` first")  # fmt: skip
