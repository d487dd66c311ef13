"""The core's config sections: every option of model, parts, adapter, data, loss, optimizer, loop and evaluation,
each declared once with its help (`option(default, "help")`, see `ivl.config`).

This module imports no torch (nor anything that does), so `ivl sft --help` lists the options at once; a `validate`
that needs a heavier module (the preset list, the chat templates, the stage rules) imports it when it runs.
Adding an option: add a field `name: type = option(default, "one line of help")` to its section, use it where it
acts; `ivl <recipe> --help`, `--show-config` and the field-help test pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ivl.config import option, section
from ivl.errors import ConfigError

Mode = Literal["frozen", "lora", "full"]
AdapterKind = Literal["lora", "partial_lora"]
Stage = Literal["none", "stage1", "stage1.5", "stage2", "stage2-lora"]
Reduction = Literal["token", "sample", "square"]
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused before decoding (decompression bombs)


@dataclass
class ModelConfig:
    """Which model to adapt, and how to load it."""

    name_or_path: str = option("preset:tiny-112", "hub id, local directory, or preset:NAME (`ivl presets` lists them)")
    tokenizer: str | None = option(None, "tokenizer to use; null: the model's own (the demo tokenizer for presets)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights' dtype; auto: bfloat16 on a bf16-capable GPU, else float32"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = option(
        "sdpa", "attention kernel transformers uses"
    )
    trust_remote_code: bool = option(False, "allow a hub checkpoint's own Python code (original InternVL layout)")
    init_seed: int = option(0, "random weights of a preset (preset:NAME) only; no effect on a real checkpoint")

    def validate(self) -> None:
        from ivl.model.presets import PRESETS

        if self.name_or_path.startswith("preset:"):
            name = self.name_or_path[len("preset:") :]
            if name not in PRESETS:
                raise ConfigError(f"name_or_path: unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        if not self.name_or_path:
            raise ConfigError("name_or_path: give a hub id (OpenGVLab/InternVL3-1B-hf), a local path or preset:NAME")


@dataclass
class PartConfig:
    """How one model part trains. `mode` unset: as the stage says (or the default LoRA recipe)."""

    mode: Mode | None = option(None, "frozen | lora | full; null: as `stage` says (default: the LoRA recipe)")
    lr: float | None = option(None, "this part's learning rate; null: optim.lr")
    gradient_checkpointing: bool = option(False, "recompute this part's activations in the backward pass")
    checkpoint_every: int = option(
        1, "with gradient_checkpointing: recompute every k-th layer only (0, k, 2k, ...); the others keep activations"
    )

    def validate(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1 (1: every layer), got {self.checkpoint_every}")


@dataclass
class VisionPartConfig(PartConfig):
    """How the vision encoder (ViT) trains. `mode` unset: as the stage says (or the default LoRA recipe)."""

    unfreeze_last_layers: int = option(0, "with mode frozen: train the last N ViT layers fully")
    # Layer-wise LR decay (InternLM-XComposer2): ViT layer i of L (1-based) trains at lr * decay^(L - i), the
    # embeddings at lr * decay^L, anything after the last layer at lr.
    lr_layer_decay: float = option(1.0, "ViT layer i of L trains at lr * decay^(L - i); 1.0: off (XComposer2: 0.9)")

    def validate(self) -> None:
        super().validate()
        if self.unfreeze_last_layers < 0:
            raise ConfigError("vision.unfreeze_last_layers must be >= 0")
        if not 0 < self.lr_layer_decay <= 1:
            raise ConfigError(f"vision.lr_layer_decay must be in (0, 1] (1 turns it off), got {self.lr_layer_decay}")


@dataclass
class AdapterConfig:
    """LoRA settings shared by every LoRA part (r 16 for domain SFT up to 128, alpha = 2r).

    `kind: partial_lora` (InternLM-XComposer2, which used r 256): the LLM's LoRA update only at image-token
    positions, so text goes through the frozen LLM unchanged; ViT / projector LoRA stays ordinary.
    """

    kind: AdapterKind = option("lora", "lora, or partial_lora: the LLM's LoRA update at image-token positions only")
    r: int = option(16, "LoRA rank")
    alpha: int = option(32, "LoRA alpha (the update is scaled by alpha / r; alpha = 2r is usual)")
    dropout: float = option(0.05, "dropout on the LoRA input")
    use_dora: bool = option(False, "DoRA: weight-decomposed LoRA (not with partial_lora)")
    use_rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)")
    qlora: bool = option(False, "the LLM in 4-bit NF4 (double quantisation) via bitsandbytes; ViT, projector as is")
    llm_targets: list[str] = option(
        help="LLM layers to adapt: linear layers by name, and in a mixture-of-experts LLM experts.gate_up_proj, "
        "experts.down_proj, router; empty: every linear layer of the family and the experts (not the router)",
        factory=list,
    )
    llm_layers: list[int] = option(help="LLM decoder layers (0-based) to adapt; empty: all", factory=list)

    def validate(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ConfigError(f"adapter.r and adapter.alpha must be >= 1, got {self.r} and {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if self.kind == "partial_lora" and self.use_dora:
            raise ConfigError(
                "adapter.use_dora: DoRA rescales the whole weight matrix, so it cannot be limited to image tokens; "
                "drop use_dora or use adapter.kind=lora"
            )


@dataclass
class DataConfig:
    """Where the data is and how samples are built from it."""

    train: str | None = option(None, "InternVL jsonl, meta .json, or HF dataset (saved dir, data file, or hub id)")
    validation: str | None = option(None, "held-out data, same forms as train; null: no evaluation")
    # A meta file sets `root` per dataset instead; this is for the forms that have no meta file.
    image_root: str | None = option(
        None, "folder relative image / video paths of a plain jsonl or dataset resolve against; null: the file's folder"
    )
    template: str = option(
        "auto", "auto | tokenizer | internvl2_5 | internlm2-chat | Hermes-2 | phi3-chat | internvl3_5 (thinking mode)"
    )
    max_length: int = option(4096, "tokens after image expansion; longer samples are bad rows, never truncated")
    min_tiles: int = option(1, "fewest tiles per image (dynamic tiling)")
    max_tiles: int = option(6, "most tiles per image (InternVL's max_dynamic_patch; a meta entry's overrides it)")
    use_thumbnail: bool = option(True, "add a whole-image thumbnail tile when an image has several tiles")
    jpeg_augment: bool | None = option(None, "random JPEG re-compression of training images; null: per meta entry")
    num_video_frames: int = option(8, "frames sampled per video")
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, "larger images are refused before decoding")
    on_error: Literal["fail", "skip"] = option("fail", "a bad row fails the run (with the report), or is left out")
    drop_repetitive: bool = option(False, "treat samples the repetition filters flag as bad rows")
    streaming: bool = option(False, "read the data as a stream (no full download; needs packing)")
    seed: int = option(0, "sample building: repeat_time subsets, augmentation and video frames, per (seed, index)")
    # Packing (ivl/data/packing.py): several samples per sequence, each attending only to itself.
    packing: bool = option(False, "pack several samples per sequence, each attending only to itself")
    pack_max_tokens: int = option(8192, "tokens per packed sequence (a longer sample is split between images)")
    pack_max_tiles: int = option(48, "image tiles per packed sequence (data.max_tiles is per image)")
    pack_buffer_size: int = option(64, "unfinished packs kept while searching for the longest sample that fits")
    padding_free: bool = option(
        False, "without packing: each micro-batch's samples in one row, each attending only to itself (no padding)"
    )

    def validate(self) -> None:
        from ivl.data.chat import TEMPLATE_CHOICES

        if self.template not in TEMPLATE_CHOICES:
            raise ConfigError(f"template: {self.template!r} is not one of {', '.join(TEMPLATE_CHOICES)}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles} and {self.max_tiles}")
        if self.max_length < 16:
            raise ConfigError(f"max_length: {self.max_length} is too short for any chat sample")
        if not 1 <= self.num_video_frames <= 64:
            raise ConfigError("num_video_frames: use 8-32 frames as InternVL does")
        if self.packing and self.padding_free:
            raise ConfigError("data.padding_free is for runs without packing (packed rows have no padding); set one")
        if self.packing:
            self._validate_packing()

    def _validate_packing(self) -> None:
        image_tiles = self.max_tiles + (1 if self.use_thumbnail and self.max_tiles > 1 else 0)
        if self.pack_max_tiles < image_tiles:
            raise ConfigError(
                f"pack_max_tiles: {self.pack_max_tiles} cannot hold one image of max_tiles {self.max_tiles}"
                f"{' + thumbnail' if image_tiles > self.max_tiles else ''} ({image_tiles} tiles): raise it"
            )
        if self.pack_max_tokens < 16:
            raise ConfigError(f"pack_max_tokens: {self.pack_max_tokens} is too short for any chat sample")
        if self.pack_buffer_size < 1:
            raise ConfigError(f"pack_buffer_size: {self.pack_buffer_size} must be >= 1")


@dataclass
class DataCheckConfig:
    """What `ivl data check` reads: the `model` (for tile size, tokens per tile, tokenizer) and `data` sections of
    any recipe config. The default model has InternVL's real geometry: 448 px tiles, 256 tokens per tile."""

    model: ModelConfig = section(ModelConfig, lambda: ModelConfig(name_or_path="preset:tiny"))
    data: DataConfig = section(DataConfig)


@dataclass
class LossConfig:
    """How the supervised tokens of a step are averaged."""

    # token: the plain token-averaged loss, whose numbers `ivl eval` reports too; sample / square: InternVL 2.5's
    # per-sample reweighting (a sample with x targets weighs each 1/x or 1/sqrt(x)), square its default.
    reduction: Reduction = option("token", "token: every token counts the same | sample: 1/x | square: 1/sqrt(x)")
    kernel: Literal["torch", "liger"] = option(
        "torch",
        "SFT loss: torch (any device; gradient computed in the forward chunk) | liger (Liger's fused Triton "
        "kernel: CUDA with liger-kernel installed)",
    )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule. Per-part learning rates (`vision.lr` ...) override `lr`."""

    lr: float = option(1e-4, "peak learning rate (of every part without its own `lr`)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = option(
        "adamw", "adamw (torch), or bitsandbytes' 8-bit states"
    )
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate schedule after warm-up")
    warmup_ratio: float = option(0.03, "linear warm-up, as a fraction of the total optimizer steps")
    min_lr_ratio: float = option(0.0, "cosine floor, as a fraction of the peak")
    max_grad_norm: float = option(1.0, "gradient-norm clipping; 0 turns it off")

    def validate(self) -> None:
        if self.lr <= 0:  # inf / nan never get here: `ivl.config` refuses every non-finite number
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optim.betas must both be in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be positive, got {self.eps}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LoopConfig:
    """Steps, batching, precision, evaluation, checkpointing and logging of a training run."""

    output_dir: str = option("outputs/run", "where checkpoints, metrics and the final adapter / model go")
    batch_size: int = option(4, "samples per micro-batch, per device")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(0, "optimizer steps; 0: as many as `epochs` gives")
    epochs: float = option(1.0, "passes over the training data (when max_steps is 0)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast; auto: bf16 / fp16 when the model is, else none"
    )
    seed: int = option(42, "training randomness: data order and the global RNG (adapter init, dropout)")
    log_every: int = option(10, "optimizer steps between metric lines")
    eval_every: int = option(0, "optimizer steps between evaluations (the eval section); 0: only at the end")
    save_every: int = option(0, "optimizer steps between resumable checkpoints; 0: only the final adapter / model")
    keep_last: int = option(2, "resumable checkpoints kept")
    resume: str = option(
        "auto",
        "auto: from the newest good checkpoint in output_dir, if any, of the same run (config, base weights) | "
        "force: that checkpoint even if the config or base changed | never | a checkpoint dir",
    )
    num_workers: int = option(2, "DataLoader worker processes building samples")
    cpu_threads: int = option(
        0,
        "threads of torch's CPU operators (torch.set_num_threads) in this process; 0: torch's default (one per core). "
        "Tiny models, like the demo's, run fastest on 1, and a fixed count makes CPU results the same on every machine",
    )
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "a step whose loss / gradient norm is inf or NaN: stop the run there | skip that update (counted)"
    )
    report_to: list[str] = option(help="Accelerate trackers: tensorboard, wandb, ...", factory=list)

    # What evaluates, and how, is the eval section's: one name for the evaluation batch size everywhere.
    RENAMED = {"eval_batch_size": "eval.batch_size", "exact_match_samples": "eval.exact_match_samples",
               "max_new_tokens": "eval.max_new_tokens"}  # fmt: skip

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError("loop.max_steps must be >= 0 and loop.epochs > 0")
        for name in ("num_workers", "save_every", "eval_every", "cpu_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loop.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EvalSettings:
    """Evaluation on data.validation: the token-weighted loss, and greedy exact-match on short answers."""

    batch_size: int = option(8, "samples per evaluation batch (MPO: also per reference log-prob pass)")
    exact_match_samples: int = option(0, "greedy exact-match on the first N validation samples; -1: all, 0: off")
    max_new_tokens: int = option(16, "longest generated answer in exact-match")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.exact_match_samples < -1:
            raise ConfigError(f"eval.exact_match_samples: N, -1 (all) or 0 (off), got {self.exact_match_samples}")

    def exact_match_records(self, records: list) -> list:
        """The records exact-match runs on: the first `exact_match_samples` (all for -1, none for 0)."""
        return list(records) if self.exact_match_samples < 0 else list(records[: self.exact_match_samples])


@dataclass
class TrainConfig:
    """The sections every fine-tuning recipe (SFT, MPO) shares: model, parts, adapter, data, loss, optimizer, loop,
    evaluation."""

    model: ModelConfig = section(ModelConfig)
    stage: Stage = option("none", "stage1 | stage1.5 | stage2 | stage2-lora: InternVL's presets of the part modes")
    vision: VisionPartConfig = section(VisionPartConfig)
    projector: PartConfig = section(PartConfig, help="How the projector (ViT -> LLM MLP) trains; `mode` as above.")
    llm: PartConfig = section(PartConfig, help="How the language model trains; `mode` as above.")
    adapter: AdapterConfig = section(AdapterConfig)
    data: DataConfig = section(DataConfig)
    loss: LossConfig = section(LossConfig)
    optim: OptimConfig = section(OptimConfig)
    loop: LoopConfig = section(LoopConfig)
    eval: EvalSettings = section(EvalSettings)

    def validate(self) -> None:
        from ivl.model.adapters import validate_modes

        if not self.data.train:
            raise ConfigError("data.train: give the training data (InternVL jsonl, meta .json or HF dataset)")
        if self.data.streaming and not self.data.packing:
            raise ConfigError(
                "data.streaming: SFT streams through the packer (its position in the stream is what resumes); "
                "set data.packing=true too, or drop data.streaming"
            )
        if self.data.packing and not self.loop.max_steps:
            raise ConfigError(
                "data.packing: the number of packs per epoch is known only while packing; set loop.max_steps"
            )
        # Stage / mode conflicts and adapter constraints are config errors, reported before anything loads.
        validate_modes(self.modes(), self.adapter, self.vision)

    def modes(self) -> dict[str, str]:
        from ivl.model.adapters import resolve_modes

        return resolve_modes(self.stage, self.vision, self.projector, self.llm)


@dataclass
class EvalOptions(EvalSettings):
    """What `ivl eval` measures, and on which adapter (an SFT config's eval section works as is)."""

    exact_match_samples: int = option(-1, "greedy exact-match on the first N samples; -1: all (the default), 0: off")
    adapter: str | None = option(None, "a run's adapter/ or model/ directory; null: the model as it is")


@dataclass
class EvalConfig:
    """`ivl eval`: a model, or a run's adapter on its base, on a data set. An SFT config works as is (its model and
    data sections are read)."""

    model: ModelConfig | None = option(None, "the model; with eval.adapter: defaults to the base recorded in training")
    data: DataConfig = section(DataConfig)
    eval: EvalOptions = section(EvalOptions)

    def validate(self) -> None:
        if self.model is None and not self.eval.adapter:
            raise ConfigError("give model.name_or_path, or eval.adapter (a run's adapter/ or model/ dir), or both")
        if not (self.data.validation or self.data.train):
            raise ConfigError("data.validation (or data.train): give the data to evaluate on")
