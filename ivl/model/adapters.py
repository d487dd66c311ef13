"""Which parameters train, and how: frozen / LoRA / full per model part, through PEFT.

    modes = resolve_modes(stage, vision, projector, llm)        # {"vision": "frozen", "projector": "full", ...}
    model = apply_trainability(model, modes, vision, adapter)   # a PeftModel when any part uses LoRA

LoRA parts get PEFT LoRA layers on the linear layers `parts.lora_target_regex` names for that part and LLM family.
Fully trained parts (and `vision.unfreeze_last_layers`) become PEFT `modules_to_save` when any part uses LoRA, so
`PeftModel.from_pretrained(base, adapter_dir)` restores everything that trained; without LoRA nothing is wrapped and
the whole model is saved. Trainable parameters are kept in fp32 (master weights) even when the frozen base is bf16 or
4-bit: the forward runs under bf16 autocast, the optimizer updates fp32 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ivl.config import ConfigError, from_dict, to_dict
from ivl.model.checkpoint import read_training_info
from ivl.model.load import ModelConfig, ModelLoadError, load_model, load_tokenizer, save_checkpoint
from ivl.model.parts import PARTS, Part, lora_target_regex, model_parts, part_modules, part_of, vision_layer_module

Mode = Literal["frozen", "lora", "full"]
Stage = Literal["none", "stage1", "stage1.5", "stage2", "stage2-lora"]

# SPEC 8: stage 1 aligns the projector, stage 1.5 adds the ViT, stage 2 trains everything (or LoRA on the LLM).
STAGES: dict[str, dict[Part, Mode]] = {
    "stage1": {"vision": "frozen", "projector": "full", "llm": "frozen"},
    "stage1.5": {"vision": "full", "projector": "full", "llm": "frozen"},
    "stage2": {"vision": "full", "projector": "full", "llm": "full"},
    "stage2-lora": {"vision": "frozen", "projector": "full", "llm": "lora"},
}
# Without a stage: the official InternVL LoRA recipe (frozen ViT, trained projector, LoRA on the LLM).
DEFAULT_MODES: dict[Part, Mode] = STAGES["stage2-lora"]


@dataclass
class PartConfig:
    """How one model part trains. `mode` unset: as the stage says (or the default LoRA recipe)."""

    mode: Mode | None = None
    lr: float | None = None  # None: optim.lr
    gradient_checkpointing: bool = False  # recompute this part's activations in the backward pass

    def validate(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


@dataclass
class VisionPartConfig(PartConfig):
    unfreeze_last_layers: int = 0  # with mode frozen: train the last N ViT layers fully

    def validate(self) -> None:
        super().validate()
        if self.unfreeze_last_layers < 0:
            raise ConfigError("vision.unfreeze_last_layers must be >= 0")


@dataclass
class AdapterConfig:
    """LoRA settings shared by every LoRA part (SPEC 8: r 16 for domain SFT up to 128, alpha = 2r)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    use_dora: bool = False
    use_rslora: bool = False
    qlora: bool = False  # the LLM in 4-bit NF4 (double quantisation) via bitsandbytes; ViT and projector unquantised

    def validate(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ConfigError(f"adapter.r and adapter.alpha must be >= 1, got {self.r} and {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")


def resolve_modes(stage: str, vision: PartConfig, projector: PartConfig, llm: PartConfig) -> dict[Part, Mode]:
    """Each part's mode: explicit setting, else the stage's, else the default LoRA recipe. A conflict is an error."""
    preset = STAGES.get(stage, DEFAULT_MODES)
    modes: dict[Part, Mode] = {}
    for part, config in zip(PARTS, (vision, projector, llm), strict=True):
        if stage != "none" and config.mode is not None and config.mode != preset[part]:
            raise ConfigError(
                f"{part}.mode={config.mode} contradicts stage {stage} ({part} is {preset[part]} there); "
                "drop one of the two, or use stage=none"
            )
        modes[part] = config.mode or preset[part]
    if not any(mode != "frozen" for mode in modes.values()):
        raise ConfigError("every part is frozen: nothing would train (set vision/projector/llm .mode)")
    return modes


def validate_modes(modes: dict[Part, Mode], adapter: AdapterConfig, vision: VisionPartConfig) -> None:
    if adapter.qlora and modes["llm"] != "lora":
        raise ConfigError(f"adapter.qlora quantises the LLM, so llm.mode must be lora (got {modes['llm']})")
    if vision.unfreeze_last_layers and modes["vision"] != "frozen":
        raise ConfigError(
            f"vision.unfreeze_last_layers applies to a frozen ViT, but vision is {modes['vision']} "
            "(set vision.mode=frozen, or drop unfreeze_last_layers)"
        )


def _full_modules(model: nn.Module, modes: dict[Part, Mode], unfreeze_last_layers: int) -> list[str]:
    names = [name for part in PARTS if modes[part] == "full" for name in part_modules(part)]
    num_layers = len(model_parts(model).vision_layers)
    if unfreeze_last_layers > num_layers:
        raise ConfigError(f"vision.unfreeze_last_layers={unfreeze_last_layers} but the ViT has {num_layers} layers")
    names += [vision_layer_module(i) for i in range(num_layers - unfreeze_last_layers, num_layers)]
    return names


def apply_trainability(
    model: nn.Module, modes: dict[Part, Mode], vision: VisionPartConfig, adapter: AdapterConfig
) -> nn.Module:
    """Freeze, wrap and unfreeze `model` as the modes say; returns the model to train (PeftModel if any LoRA)."""
    validate_modes(modes, adapter, vision)
    full_modules = _full_modules(model, modes, vision.unfreeze_last_layers)
    lora_parts = tuple(part for part in PARTS if modes[part] == "lora")
    model.requires_grad_(False)
    if lora_parts:
        config = LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            use_dora=adapter.use_dora,
            use_rslora=adapter.use_rslora,
            target_modules=lora_target_regex(model, lora_parts),
            modules_to_save=full_modules or None,
        )
        model = get_peft_model(model, config)
    else:
        for name, module in model.named_modules():
            if any(name == full or name.endswith("." + full) for full in full_modules):
                module.requires_grad_(True)
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def is_peft(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def trainable_report(model: nn.Module, modes: dict[Part, Mode]) -> list[dict]:
    """Per part: mode, trainable and total parameter counts (frozen copies PEFT keeps for modules_to_save excluded)."""
    rows = {part: {"part": part, "mode": modes[part], "trainable": 0, "total": 0} for part in PARTS}
    for name, parameter in model.named_parameters():
        if ".original_module." in name:
            continue
        row = rows[part_of(name.replace(".modules_to_save.default.", ".").replace(".base_layer.", "."))]
        count = parameter.numel() * (2 if parameter.dtype == torch.uint8 else 1)  # packed 4-bit: 2 values a byte
        row["total"] += count
        if parameter.requires_grad:
            row["trainable"] += count
    return list(rows.values())


def format_report(rows: list[dict]) -> str:
    lines = [f"{'part':<10} {'mode':<7} {'trainable':>12} {'of':>12}"]
    for row in rows:
        lines.append(f"{row['part']:<10} {row['mode']:<7} {row['trainable']:>12,} {row['total']:>12,}")
    return "\n".join(lines)


def parameter_groups(
    model: nn.Module, base_lr: float, weight_decay: float, part_lrs: dict[Part, float | None]
) -> list[dict]:
    """Optimizer groups: one per (part, decayed or not). Biases, norms and layer scales get no weight decay."""
    groups: dict[tuple[Part, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = part_of(name.replace(".modules_to_save.default.", "."))
        decay = parameter.ndim >= 2 and "lora_magnitude" not in name
        key = (part, decay)
        if key not in groups:
            lr = part_lrs.get(part) or base_lr
            groups[key] = {"params": [], "lr": lr, "weight_decay": weight_decay if decay else 0.0, "part": part}
        groups[key]["params"].append(parameter)
    return list(groups.values())


def load_trained(path: str | Path, base: ModelConfig | None = None, device=None):
    """(model, tokenizer, training info) from a run's `adapter/` (on its base) or `model/` directory, in eval mode.

    The base defaults to the one recorded at training time; a QLoRA adapter is loaded on the 4-bit base it trained on.
    """
    path = Path(path)
    info = read_training_info(path)
    if not (path / "adapter_config.json").is_file():
        # A whole trained model: its own weights and tokenizer, with the base's loading options (dtype, attention).
        options = to_dict(base) if base is not None else info.get("base_model", {})
        config = from_dict(ModelConfig, {**options, "name_or_path": str(path), "tokenizer": None})
        model, tokenizer = load_model(config, device)
        return model, tokenizer, info
    model, _ = load_model(_recorded_base(path, info, base), device, quantize_llm=bool(info.get("qlora")))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    return PeftModel.from_pretrained(model, path).eval(), tokenizer, info


def _recorded_base(path: Path, info: dict, base: ModelConfig | None) -> ModelConfig:
    """The base to put an adapter on: the one given, else the one recorded at training time."""
    if base is not None:
        return base
    if "base_model" not in info:
        raise ModelLoadError(f"{path} does not say which base it was trained on: pass the base model (--base)")
    return from_dict(ModelConfig, info["base_model"])


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: ModelConfig | None = None,
    out_format: Literal["hf", "original"] = "hf",
) -> Path:
    """Fold a LoRA adapter (and its modules_to_save) into its base and write an HF-native checkpoint, or an original
    InternVLChatModel one (`out_format="original"`, see `ivl.model.convert`).

    A QLoRA adapter trained against the 4-bit base, so it is merged into that base's dequantised weights (the
    weights it actually saw), not into the original high-precision ones.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    info = read_training_info(adapter_dir)
    model, _ = load_model(_recorded_base(adapter_dir, info, base), quantize_llm=bool(info.get("qlora")))
    if info.get("qlora"):
        model = model.dequantize()  # transformers swaps each 4-bit linear for a plain one with the dequantised weight
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(adapter_dir)))
    if out_format == "original":
        from ivl.model.convert import save_model_as_original

        return save_model_as_original(merged, tokenizer, out_dir)
    return save_checkpoint(merged, tokenizer, out_dir)
