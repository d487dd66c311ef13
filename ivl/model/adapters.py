"""Which parameters train, and how: frozen / LoRA / full per model part, through PEFT.

    modes = resolve_modes(stage, vision, projector, llm)        # {"vision": "frozen", "projector": "full", ...}
    model = apply_trainability(model, modes, vision, adapter)   # a PeftModel when any part uses LoRA

LoRA parts get PEFT LoRA layers on the linear layers `parts.lora_target_regex` names for that part and LLM family
(`adapter.llm_targets` / `adapter.llm_layers` narrow the LLM's); a mixture-of-experts LLM also gets LoRA on its fused
expert weights (PEFT `target_parameters`, `parts.lora_target_parameters`), its router only when named.
`adapter.kind: partial_lora` makes the LLM's LoRA update apply at image-token positions only
(`ivl.model.partial_lora`); such an adapter cannot be merged, and leaves the experts out (their LoRA changes the fused
weights, which no token mask can limit).
Fully trained parts (and `vision.unfreeze_last_layers`) become PEFT `modules_to_save` when any part uses LoRA, so
`PeftModel.from_pretrained(base, adapter_dir)` restores everything that trained; without LoRA nothing is wrapped and
the whole model is saved. Trainable parameters are kept in fp32 (master weights) even when the frozen base is bf16 or
4-bit: the forward runs under bf16 autocast, the optimizer updates fp32 values.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ivl.config import ConfigError, from_dict, to_dict
from ivl.model.checkpoint import read_training_info
from ivl.model.load import ModelConfig, ModelLoadError, adapter_base, load_model, load_tokenizer, save_checkpoint
from ivl.model.partial_lora import (
    NOT_MERGEABLE,
    PartialLoraMergeError,
    attach_partial_lora,
    partial_lora_of,
    read_marker,
    write_marker,
)
from ivl.model.parts import (
    PARTS,
    Part,
    llm_lora_targets,
    lora_target_parameters,
    lora_target_regex,
    model_parts,
    part_modules,
    part_of,
    unwrap,
    vision_depth,
    vision_layer_module,
)
from ivl.model.processor import save_processor
from ivl.options import AdapterConfig, Mode, PartConfig, VisionPartConfig

# Stages (docs/design/trainability.md): stage 1 aligns the projector, stage 1.5 adds the ViT, stage 2 trains everything
# (or LoRA on the LLM).
STAGES: dict[str, dict[Part, Mode]] = {
    "stage1": {"vision": "frozen", "projector": "full", "llm": "frozen"},
    "stage1.5": {"vision": "full", "projector": "full", "llm": "frozen"},
    "stage2": {"vision": "full", "projector": "full", "llm": "full"},
    "stage2-lora": {"vision": "frozen", "projector": "full", "llm": "lora"},
}
# Without a stage: the official InternVL LoRA recipe (frozen ViT, trained projector, LoRA on the LLM).
DEFAULT_MODES: dict[Part, Mode] = STAGES["stage2-lora"]


@contextmanager
def peft_wrap_quietly() -> Iterator[None]:
    """PEFT (0.21 and before) reads `model.is_gradient_checkpointing` when it wraps a model; transformers 5 renamed
    that property `is_activation_checkpointing` and warns (FutureWarning) on every read of the old name, so every
    adapter load and training run printed the warning. Both names give the same value: only that one warning is
    silenced, and only while PEFT wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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
    if adapter.kind == "partial_lora" and modes["llm"] != "lora":
        raise ConfigError(
            f"adapter.kind=partial_lora puts a LoRA update on the LLM's image tokens, so llm.mode must be lora "
            f"(got {modes['llm']}); or use adapter.kind=lora"
        )
    if (adapter.llm_targets or adapter.llm_layers) and modes["llm"] != "lora":
        raise ConfigError(f"adapter.llm_targets / llm_layers choose LLM LoRA layers, but llm.mode is {modes['llm']}")
    if vision.unfreeze_last_layers and modes["vision"] != "frozen":
        raise ConfigError(
            f"vision.unfreeze_last_layers applies to a frozen ViT, but vision is {modes['vision']} "
            "(set vision.mode=frozen, or drop unfreeze_last_layers)"
        )
    if vision.lr_layer_decay != 1 and modes["vision"] == "frozen" and not vision.unfreeze_last_layers:
        raise ConfigError(
            "vision.lr_layer_decay: the ViT is frozen, so there is nothing to decay (set vision.mode=lora|full or "
            "vision.unfreeze_last_layers, or drop lr_layer_decay)"
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
        targets, layers = tuple(adapter.llm_targets), tuple(adapter.llm_layers)
        parameters = lora_target_parameters(model, targets, layers) if modes["llm"] == "lora" else []
        if parameters and (adapter.kind == "partial_lora" or adapter.use_dora):
            if targets:  # asked for explicitly: refuse; by default: the experts are left out
                named = sorted(set(targets) - set(llm_lora_targets(model)))
                raise ConfigError(
                    f"adapter.llm_targets: expert / router LoRA is a change of the fused weights, so it can be neither "
                    f"limited to image tokens nor DoRA-rescaled; drop {named}"
                )
            parameters = []
        if parameters and adapter.dropout:
            raise ConfigError(
                f"adapter.dropout={adapter.dropout}: PEFT's LoRA on the fused expert weights of this "
                "mixture-of-experts LLM has no dropout; set adapter.dropout=0 (or leave the experts out with "
                "adapter.llm_targets)"
            )
        config = LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            use_dora=adapter.use_dora,
            use_rslora=adapter.use_rslora,
            target_modules=lora_target_regex(model, lora_parts, targets, layers) or [],
            target_parameters=parameters or None,
            modules_to_save=full_modules or None,
        )
        with peft_wrap_quietly():
            model = get_peft_model(model, config)
        # On a model that checkpoints, PEFT hooks every input embedding (the ViT's patch embedding too) so that its
        # output requires grad, which only reentrant checkpointing needs. The kit checkpoints non-reentrantly
        # (`ivl.runtime.checkpoint_activations`); the hooks would make autograd run a backward pass through a frozen
        # ViT for nothing (a third of a LoRA step's work at InternVL3-2B's proportions).
        unwrap(model).disable_input_require_grads()
        if adapter.kind == "partial_lora":
            attach_partial_lora(model, unwrap(model).config.image_token_id)
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
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    part_lrs: dict[Part, float | None],
    vision_lr_layer_decay: float = 1.0,
) -> list[dict]:
    """Optimizer groups: one per (part, decayed or not); with layer-wise LR decay also one per ViT depth (0 the
    embeddings, i for layer i of L (1-based), L after the last layer) at lr * decay^(L - depth). Biases, norms and
    layer scales get no weight decay. Each group also says its `part`, `depth` (None without LR decay) and whether it is
    the `no_weight_decay` one."""
    num_layers = len(model_parts(model).vision_layers)
    groups: dict[tuple[Part, int | None, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = name.replace(".modules_to_save.default.", ".")
        part = part_of(name)
        decay = parameter.ndim >= 2 and "lora_magnitude" not in name
        depth = vision_depth(name, num_layers) if part == "vision" and vision_lr_layer_decay != 1 else None
        key = (part, depth, decay)
        if key not in groups:
            lr = part_lrs.get(part) or base_lr
            if depth is not None:
                lr *= vision_lr_layer_decay ** (num_layers - depth)
            groups[key] = {
                "params": [],
                "lr": lr,
                "weight_decay": weight_decay if decay else 0.0,
                "part": part,
                "depth": depth,
                "no_weight_decay": not decay,
            }
        groups[key]["params"].append(parameter)
    return list(groups.values())


def save_trained(model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a trained PEFT model (adapter files, plus the partial-LoRA marker) or a whole model to `out_dir`.
    `state_dict`: the whole tensors when the model is sharded (FSDP2); None: the model's own."""
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    if partial_lora_of(model) is not None:
        write_marker(model, out_dir)


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
    base = _recorded_base(path, info, base)
    model, _ = load_model(base, device, quantize_llm=bool(info.get("qlora")))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    peft_model = load_adapter_onto(model, path, base.name_or_path).eval()
    marker = read_marker(path)
    if marker is not None:
        if marker["image_token_id"] != model.config.image_token_id:
            raise ModelLoadError(
                f"{path} is a partial-LoRA adapter for image token id {marker['image_token_id']}, but this base uses "
                f"{model.config.image_token_id}: load it on the base it was trained on"
            )
        attach_partial_lora(peft_model, marker["image_token_id"])
    return peft_model, tokenizer, info


def load_adapter_onto(model: nn.Module, adapter_dir: str | Path, base_name: str, trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained`, with a base of other shapes refused in one line that names the base the adapter
    was trained on (PEFT's own error lists every mismatched tensor)."""
    try:
        with peft_wrap_quietly():
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except RuntimeError as error:
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise ModelLoadError(
            f"{adapter_dir} does not fit the base {base_name!r} ({mismatch}); it was trained on "
            f"{adapter_base(adapter_dir)}: load it on that base (--base / model.name_or_path)"
        ) from error


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
) -> tuple[Path, list[str]]:
    """Fold a LoRA adapter (and its modules_to_save) into its base and write an HF-native checkpoint with the
    processor files (`ivl.model.processor`), or an original InternVLChatModel one (`out_format="original"`, see
    `ivl.model.convert`) with the base's remote code when the base is an original checkpoint. Returns the directory
    and notes for the user (what the output still lacks).

    A QLoRA adapter trained against the 4-bit base, so it is merged into that base's dequantised weights (the
    weights it actually saw), not into the original high-precision ones. A partial-LoRA adapter is refused
    (`PartialLoraMergeError`): its update is token-conditional, no weight matrix equals it.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    if read_marker(adapter_dir) is not None:
        raise PartialLoraMergeError(f"{adapter_dir}: {NOT_MERGEABLE}")
    info = read_training_info(adapter_dir)
    base_config = _recorded_base(adapter_dir, info, base)
    model, _ = load_model(base_config, quantize_llm=bool(info.get("qlora")))
    if info.get("qlora"):
        from ivl.model.quantize import dequantized

        model = dequantized(model)  # 4-bit linear layers and MoE experts, dequantised
    merged = load_adapter_onto(model, adapter_dir, base_config.name_or_path).merge_and_unload()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(adapter_dir)))
    if out_format == "original":
        from ivl.model.convert import is_original_checkpoint, remote_code_notes, save_model_as_original

        out = save_model_as_original(merged, tokenizer, out_dir)
        base_dir = Path(base_config.name_or_path)
        return out, remote_code_notes(out, base_dir if base_dir.is_dir() and is_original_checkpoint(base_dir) else None)
    out = save_checkpoint(merged, tokenizer, out_dir)
    save_processor(out, base_config, merged.config, info.get("data"))
    return out, []
