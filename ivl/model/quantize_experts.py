"""NF4 storage for the fused MoE experts that bitsandbytes' 4-bit loading leaves dense (it quantises `nn.Linear` only).

    quantize_experts(model, torch.bfloat16)   # after loading: every MoE layer's experts held in 4 bits, in place
    dequantize_experts(model)                 # before a merge: transformers' own experts, dequantised weights

Why a custom experts module and not a parametrization: PEFT's LoRA on a fused 3-D parameter (`target_parameters`,
`lora.ParamWrapper`) registers a parametrization on the module that owns the parameter for the duration of each
forward, so that the module reads `W + delta` where it reads `W`. A parametrization that held the NF4 data and returned
the dense weight would be evaluated on the whole [E, rows, cols] stack at each forward: every expert dequantised,
routed or not. `Experts4bit` instead keeps two things apart. Its `gate_up_proj` / `down_proj` parameters have the full
[E, rows, cols] shape but are zeros expanded from one element (stride 0, no memory): PEFT sizes its adapter from them
and adds its LoRA delta to them, unmodified. Its forward adds the NF4 base weight of each expert that receives tokens,
dequantised one expert at a time by bitsandbytes, to that expert's slice. So the dense base weight never exists, PEFT
runs as it does for dense experts, and merging dequantises once and lets PEFT fold the LoRA in (`dequantize_experts`).
What stays PEFT's: its delta is computed for the whole stack at each forward, a transient [E, rows, cols] tensor in the
compute dtype (0.8 GB for a 30B-A3B layer's gate_up stack in bf16, 0.4 GB for down_proj), as it is for dense experts.

Storage: each expert quantised on its own by `bitsandbytes.functional.quantize_4bit` (NF4, blocks of 64 weights, double
quantisation of the block scales: what bitsandbytes does for linear layers), the results stacked per field: packed
weights [E, rows * cols / 2] uint8, quantised scales [E, blocks] uint8, their scales [E, scale blocks] fp32, offsets [E]
fp32; about 0.52 bytes per weight against bf16's 2. The code tables (NF4's 16 values, the scales' 256) are kept as
bitsandbytes returned them, one tensor shared by the stacks that quantised with the same table.

Families: Qwen3-MoE (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], read as `F.linear(x, W[e])`) and GPT-OSS
(transposed: `gate_up_proj` [E, H, 2I] with gate and up interleaved, `down_proj` [E, I, H], read as `x @ W[e] + b[e]`;
its biases stay dense, [E, 2I] + [E, H] is small, and its clamped gate is transformers' own `_apply_gate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCKSIZE = 64  # weights per NF4 block, as bitsandbytes' Linear4bit
WEIGHTS = ("gate_up_proj", "down_proj")


def _expert_classes() -> dict[type, str]:
    """transformers' fused experts classes -> how their weights are read ("linear": F.linear(x, W[e]); "matmul":
    x @ W[e] + bias[e])."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    return {Qwen3MoeExperts: "linear", GptOssExperts: "matmul"}


_TABLES: dict[tuple, Tensor] = {}


def _shared(table: Tensor) -> Tensor:
    """One tensor per distinct code table and device, held by every stack that quantised with it."""
    key = (table.device, table.dtype, table.cpu().numpy().tobytes())
    return _TABLES.setdefault(key, table)


class NF4Stack(nn.Module):
    """One [E, rows, cols] weight stack in NF4, one expert dequantised at a time."""

    def __init__(self, weight: Tensor) -> None:
        import bitsandbytes.functional as bnb

        super().__init__()
        states, packed = [], []
        for expert in weight:  # [rows, cols]
            data, state = bnb.quantize_4bit(expert, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
            packed.append(data.reshape(-1))
            states.append(state)
        self.expert_shape = tuple(weight.shape[1:])
        self.register_buffer("packed", torch.stack(packed))  # [E, rows * cols / 2] uint8, two weights per byte
        self.register_buffer("scales", torch.stack([s.absmax for s in states]))  # [E, blocks] uint8
        self.register_buffer("scale_scales", torch.stack([s.state2.absmax for s in states]))  # [E, blocks / 256] fp32
        self.register_buffer("offsets", torch.stack([s.offset for s in states]))  # [E] fp32
        self.scale_blocksize = states[0].state2.blocksize
        # The code tables exactly as bitsandbytes quantised with them, 1 KiB per stack. Not bitsandbytes' constructors
        # (`get_4bit_type("nf4")`, `create_dynamic_map()`): its CPU kernel up to 0.46 sets the dynamic map's first
        # value to -1.0 in place (from -0.993) before quantising the scales, so the map a state carries depends on
        # the release and the device.
        self.register_buffer("code", _shared(states[0].code))  # [16] fp32, NF4's values
        self.register_buffer("scale_code", _shared(states[0].state2.code))  # [256] fp32, the scales' 8-bit map
        if any(not torch.equal(s.code, self.code) or not torch.equal(s.state2.code, self.scale_code) for s in states):
            raise RuntimeError("bitsandbytes quantised the experts of one stack with different code tables")

    def expert(self, index: int, dtype: torch.dtype) -> Tensor:
        """Expert `index`'s weight [rows, cols], dequantised by bitsandbytes, in `dtype`."""
        from bitsandbytes.functional import QuantState, dequantize_4bit

        nested = QuantState(
            absmax=self.scale_scales[index], code=self.scale_code, blocksize=self.scale_blocksize, dtype=torch.float32
        )
        state = QuantState(
            absmax=self.scales[index], shape=torch.Size(self.expert_shape), code=self.code, blocksize=BLOCKSIZE,
            quant_type="nf4", dtype=dtype, offset=self.offsets[index], state2=nested,
        )  # fmt: skip
        return dequantize_4bit(self.packed[index].unsqueeze(1), state)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The whole stack [E, rows, cols] in `dtype` (for merging)."""
        return torch.stack([self.expert(index, dtype) for index in range(self.packed.shape[0])])


def _zeros(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A frozen all-zero parameter of `shape` that holds one element (expanded, stride 0)."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


class Experts4bit(nn.Module):
    """transformers' fused experts with their weight stacks in NF4 (see the module docstring)."""

    def __init__(self, experts: nn.Module, kind: str, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.dense_class, self.kind, self.config = type(experts), kind, experts.config
        self.num_experts = experts.num_experts
        self.is_transposed = kind == "matmul"  # PEFT reads it: GPT-OSS's stacks are [E, in, out]
        for name in WEIGHTS:
            weight = getattr(experts, name)
            setattr(self, name + "_nf4", NF4Stack(weight.detach()))
            setattr(self, name, _zeros(weight.shape, compute_dtype, weight.device))
            if kind == "matmul":  # GPT-OSS's biases, kept as they are
                setattr(self, name + "_bias", getattr(experts, name + "_bias"))
        self.act_fn = getattr(experts, "act_fn", None)
        self.alpha, self.limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)

    def expert_weight(self, name: str, index: int) -> Tensor:
        """Expert `index`'s weight `name`: the NF4 base plus whatever PEFT's parametrization adds to the zero stack."""
        base = getattr(self, name + "_nf4").expert(index, getattr(self, name).dtype)
        if nn.utils.parametrize.is_parametrized(self, name):
            return base + getattr(self, name)[index]  # the LoRA delta of this expert (zero stack + delta)
        return base

    def _expert_mlp(self, x: Tensor, index: int) -> Tensor:
        """One expert on its tokens x [tokens, hidden], as transformers' eager experts compute it."""
        if self.kind == "linear":
            gate, up = F.linear(x, self.expert_weight("gate_up_proj", index)).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, self.expert_weight("down_proj", index))
        gate_up = x @ self.expert_weight("gate_up_proj", index) + self.gate_up_proj_bias[index]
        gated = self.dense_class._apply_gate(self, gate_up)
        return gated @ self.expert_weight("down_proj", index) + self.down_proj_bias[index]

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states [tokens, hidden], top_k_index / top_k_weights [tokens, k] -> [tokens, hidden]. Only the
        experts some token is routed to are dequantised."""
        output = torch.zeros_like(hidden_states)
        for index in torch.unique(top_k_index).tolist():
            token_idx, top_k_pos = torch.where(top_k_index == index)
            out = self._expert_mlp(hidden_states[token_idx], index) * top_k_weights[token_idx, top_k_pos, None]
            output.index_add_(0, token_idx, out.to(output.dtype))
        return output

    def _apply(self, fn, recurse: bool = True):
        # A move or cast would copy each stride-0 zero stack into a full tensor: apply it to one element, expand again.
        shapes = {}
        for name in WEIGHTS:
            if name in self._parameters:  # not while PEFT's parametrization holds it (inside a forward)
                shapes[name] = self._parameters[name].shape
                self._parameters[name] = nn.Parameter(self._parameters[name][:1, :1, :1], requires_grad=False)
        super()._apply(fn, recurse)
        for name, shape in shapes.items():
            self._parameters[name] = nn.Parameter(self._parameters[name].expand(shape), requires_grad=False)
        return self

    def dense(self) -> nn.Module:
        """transformers' own experts module with the dequantised weights (LoRA not included)."""
        with torch.device("meta"):  # parameters replaced below
            dense = self.dense_class(self.config)
        for name in WEIGHTS:
            stack = getattr(self, name + "_nf4").dequantize(getattr(self, name).dtype)
            dense.register_parameter(name, nn.Parameter(stack, requires_grad=False))
            if self.kind == "matmul":
                dense.register_parameter(name + "_bias", getattr(self, name + "_bias"))
        return dense


def _replace(model: nn.Module, build) -> int:
    """Replace every module for which `build(module)` gives a new one; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        new = build(module)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            replaced += 1
    return replaced


def quantize_experts(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the weights of every fused-experts module of `model` in NF4, in place; returns how many were replaced.
    Each module's dense weights are freed as soon as it is quantised."""
    classes = _expert_classes()

    def build(module: nn.Module) -> nn.Module | None:
        kind = classes.get(type(module))
        return None if kind is None else Experts4bit(module, kind, compute_dtype)

    return _replace(model, build)


def dequantize_experts(model: nn.Module) -> int:
    """Swap every `Experts4bit` of `model` back for transformers' experts with the dequantised weights."""
    return _replace(model, lambda module: module.dense() if isinstance(module, Experts4bit) else None)
