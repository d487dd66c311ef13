"""Partial LoRA (InternLM-XComposer2; docs/design/partial_lora.md): the LLM's LoRA update B·A·x is added only at
image-token positions.

    model = get_peft_model(base, lora_config)           # ordinary PEFT LoRA layers in the LLM (plain or 4-bit base)
    attach_partial_lora(model, base.config.image_token_id)

Text positions go through the frozen weights alone, so a text-only prompt gives exactly the base model's output while
the image tokens are adapted. How the per-token mask reaches the LoRA layers, with PEFT's own extension points and no
patching of any class:

1. Every LoRA layer of the LLM gets a `PartialLoraVariant` in its per-adapter variant slot (`layer.lora_variant`, the
   hook PEFT's DoRA / aLoRA use). PEFT's `lora.Linear` and bitsandbytes `Linear4bit` both call it with the frozen
   result; it adds the update at the image positions only.
2. A forward pre-hook on the InternVLModel (`parts.multimodal`, which still sees `input_ids`) computes the positions
   and passes them on as a keyword argument; transformers hands keyword arguments down to each decoder layer.
3. A forward pre-hook on each decoder layer's attention block (the first block to run, the one that receives the
   decoder layer's keyword arguments) takes them out of the arguments and publishes them to the variants.

Gradient checkpointing replays a decoder layer with the keyword arguments of its first call, so the replay publishes
the same positions again (step 3 runs inside the replay), even when several forward passes precede one backward.
The positions are those where image features are placed: `input_ids == image_token_id` in a call that carries images
(`pixel_values` or precomputed image features). Tokens generated after the prompt (KV cache, no images in the call)
are text, so they never get the update. The mask is per token, so packed rows need nothing more.

The update is token-conditional, so it cannot be folded into the weights: merging raises `PartialLoraMergeError`. A
saved adapter directory carries `partial_lora.json` beside PEFT's files; `ivl.model.adapters.load_trained` reads it.
Plain `PeftModel.from_pretrained` does not, and would apply the update at every position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ivl.errors import PartialLoraMergeError  # noqa: F401  re-exported
from ivl.model.parts import llm_attention, model_parts, part_of, unwrap

MARKER_FILE = "partial_lora.json"
POSITIONS_KWARG = "ivl_image_positions"  # the keyword argument that carries the positions through the LLM


@dataclass(frozen=True)
class ImagePositions:
    """Where the image tokens of one forward pass are. `mask` [B, T] bool; `flat_index` [N] long: the True entries
    of `mask.flatten()`, computed once per forward pass so the LoRA layers need no host sync."""

    mask: torch.Tensor
    flat_index: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> ImagePositions:
        return cls(mask, mask.flatten().nonzero().squeeze(1))


class _Published:
    """The positions of the decoder layer running now, shared by the variants of one model."""

    positions: ImagePositions | None = None


class PartialLoraVariant(LoraVariant):
    """PEFT LoRA variant: the low-rank update only at the published image positions."""

    def __init__(self, published: _Published):
        self.published = published

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to add to the layer: partial LoRA has the same weights as LoRA."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise PartialLoraMergeError(NOT_MERGEABLE)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        raise PartialLoraMergeError(NOT_MERGEABLE)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise PartialLoraMergeError(NOT_MERGEABLE)

    def forward(
        self, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """x [B, T, in], result (the frozen layer's output) [B, T, out] -> result + the update at image positions."""
        positions = self.published.positions
        if positions is None:
            raise RuntimeError(
                "partial LoRA: this LLM layer ran without image-token positions; call the whole InternVL model "
                "(forward / generate), not its language model alone"
            )
        if tuple(positions.mask.shape) != tuple(x.shape[:-1]):
            raise RuntimeError(f"partial LoRA: positions {tuple(positions.mask.shape)} for input {tuple(x.shape)}")
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        # Only the N image tokens go through A and B: [N, in] -> [N, out]; every other row of `result` is untouched.
        selected = x.reshape(-1, x.shape[-1]).index_select(0, positions.flat_index)
        update = lora_b(lora_a(dropout(selected))) * scaling
        flat = result.reshape(-1, result.shape[-1]).index_add(0, positions.flat_index, update.to(result.dtype))
        return flat.view_as(result)


NOT_MERGEABLE = (
    "a partial-LoRA adapter cannot be merged: its update applies only at image-token positions, so no single weight "
    "matrix equals it. Use it as an adapter (ivl chat / ivl eval --adapter DIR, ivl.model.adapters.load_trained)"
)


def _positions_from_inputs(args: tuple, kwargs: dict[str, Any], image_token_id: int) -> ImagePositions:
    """The image positions of an InternVLModel call: where its image features will be placed."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
    encoded = kwargs.get("mm_encoder_outputs") or {}
    has_images = pixel_values is not None or encoded.get("image") is not None
    if input_ids is None:
        if has_images:
            raise ValueError("partial LoRA needs input_ids to find the image tokens (got only inputs_embeds)")
        embeds = kwargs["inputs_embeds"]
        return ImagePositions.from_mask(torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device))
    mask = input_ids == image_token_id
    return ImagePositions.from_mask(mask if has_images else torch.zeros_like(mask))


@dataclass
class PartialLora:
    """What `attach_partial_lora` installed on a model (kept on the model as `model.partial_lora`)."""

    image_token_id: int
    num_layers: int  # LoRA layers made partial
    handles: list

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()


def _llm_lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for name, m in model.named_modules() if isinstance(m, LoraLayer) and part_of(name) == "llm"]


def attach_partial_lora(model: nn.Module, image_token_id: int, adapter_name: str = "default") -> PartialLora:
    """Make the LLM's LoRA layers of `adapter_name` partial (ViT / projector LoRA stays ordinary: it only ever sees
    image tokens) and install the hooks that deliver the image positions."""
    layers = [layer for layer in _llm_lora_layers(model) if adapter_name in layer.lora_A]
    if not layers:
        raise ValueError("partial LoRA: the model has no LoRA layers in its LLM (llm.mode must be lora)")
    published = _Published()
    for layer in layers:
        if adapter_name in layer.lora_variant:
            raise ValueError(f"partial LoRA cannot combine with {type(layer.lora_variant[adapter_name]).__name__}")
        layer.lora_variant[adapter_name] = PartialLoraVariant(published)
    parts = model_parts(model)

    def compute(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if kwargs.get(POSITIONS_KWARG) is None:  # a caller (e.g. a packing collator) may pass its own
            kwargs[POSITIONS_KWARG] = _positions_from_inputs(args, kwargs, image_token_id)
        return args, kwargs

    def publish(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        # Popped so attention kernels never see it; the decoder layer's own kwargs (kept for a replay) still hold it.
        published.positions = kwargs.pop(POSITIONS_KWARG, None)
        return args, kwargs

    def clear(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        published.positions = None  # a later direct call into the LLM must not reuse this pass's positions

    handles = [
        parts.multimodal.register_forward_pre_hook(compute, with_kwargs=True),
        parts.multimodal.register_forward_hook(clear, with_kwargs=True),
        *(llm_attention(layer).register_forward_pre_hook(publish, with_kwargs=True) for layer in parts.llm_layers),
    ]
    state = PartialLora(image_token_id, len(layers), handles)
    unwrap(model).partial_lora = state
    return state


def partial_lora_of(model: nn.Module) -> PartialLora | None:
    return getattr(unwrap(model), "partial_lora", None)


def write_marker(model: nn.Module, out_dir: str | Path) -> None:
    """Describe a partial-LoRA adapter in `out_dir` (beside PEFT's files)."""
    state = partial_lora_of(model)
    marker = {
        "kind": "partial_lora",
        "image_token_id": state.image_token_id,
        "applies_to": "the LoRA layers of the LLM (ViT / projector LoRA, if any, is ordinary)",
        "mergeable": False,
        "load_with": "ivl.model.adapters.load_trained(DIR); plain PeftModel.from_pretrained would apply the update "
        "at every position",
    }
    (Path(out_dir) / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def read_marker(path: str | Path) -> dict[str, Any] | None:
    marker = Path(path) / MARKER_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None
