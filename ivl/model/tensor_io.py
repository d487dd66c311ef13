"""Checkpoint tensors read and written one at a time, so a 26B checkpoint converts in a few GB of RAM.

    source = open_tensors(Path("InternVL2_5-8B"))                # safetensors shards (pickle only with allow_pickle)
    write_shards(out_dir, source, groups, max_shard_bytes=5 * 2**30)  # model-0000k-of-0000n.safetensors + index

A `TensorGroup` says how a few output tensors are computed from a few input tensors (a rename, a split, a join).
The writer first runs every group on meta tensors to learn the output shapes, so each shard's safetensors header is
written before its data; then it computes the groups in order and streams their bytes into the file. Peak memory is
one group's inputs plus outputs (at most about 2x the largest tensor) plus the interpreter; a source file is opened
per tensor read, so its mapped pages do not pile up (`bench/convert_memory.py`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ivl.model.load import ModelLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# safetensors dtype names <-> torch dtypes (the ones checkpoints use).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class TensorSource:
    """Named tensors, fetched one at a time: `meta(name)` (shape and dtype only) and `get(name)` (the values)."""

    def __init__(self, metas: dict[str, Tensor], fetch: Callable[[str], Tensor]) -> None:
        self._metas = metas  # name -> meta tensor
        self._fetch = fetch

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> Tensor:
        return self._metas[name]

    def get(self, name: str) -> Tensor:
        return self._fetch(name)

    def renamed(self, rename: Callable[[str], str]) -> TensorSource:
        """The same tensors under the names `rename` gives."""
        names = {rename(name): name for name in self._metas}
        if len(names) != len(self._metas):
            raise ModelLoadError("two checkpoint tensors map to the same name (a checkpoint in two layouts at once?)")
        metas = {new: self._metas[old] for new, old in names.items()}
        return TensorSource(metas, lambda name: self._fetch(names[name]))

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (the most common one, by tensor count)."""
        counts: dict[torch.dtype, int] = {}
        for meta in self._metas.values():
            if meta.dtype.is_floating_point:
                counts[meta.dtype] = counts.get(meta.dtype, 0) + 1
        return max(counts, key=counts.__getitem__) if counts else torch.float32


def tensors_in_memory(state: dict[str, Tensor]) -> TensorSource:
    """A source over tensors already in memory (a model's state dict)."""
    return TensorSource({name: tensor.to("meta") for name, tensor in state.items()}, state.__getitem__)


def open_tensors(path: Path, allow_pickle: bool = False) -> TensorSource:
    """The weights of checkpoint directory `path`: sharded or single safetensors; pickle only when allowed."""
    if (path / SAFETENSORS_INDEX).is_file():
        return _safetensors_source(_indexed_files(path, SAFETENSORS_INDEX))
    if (path / SAFETENSORS_SINGLE).is_file():
        with safe_open(str(path / SAFETENSORS_SINGLE), "pt") as handle:
            return _safetensors_source(dict.fromkeys(handle.keys(), path / SAFETENSORS_SINGLE))
    pickled = path / (PICKLE_INDEX if (path / PICKLE_INDEX).is_file() else PICKLE_SINGLE)
    if not pickled.is_file():
        raise ModelLoadError(f"{path}: no weights found (neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE})")
    if not allow_pickle:
        raise ModelLoadError(
            f"{pickled} is a pickle file: loading one can run arbitrary code. Convert it from a trusted copy only, "
            "with --allow-pickle (ivl convert) / allow_pickle=True"
        )
    if pickled.name == PICKLE_INDEX:
        return _pickle_source(_indexed_files(path, PICKLE_INDEX))
    return _pickle_source(dict.fromkeys(_load_pickle(pickled), pickled))


def _safetensors_source(files: dict[str, Path]) -> TensorSource:
    metas: dict[str, Tensor] = {}
    for file in dict.fromkeys(files.values()):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES[piece.get_dtype()]
                metas[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    missing = [name for name in files if name not in metas]
    if missing:
        raise ModelLoadError(f"the checkpoint index names {missing[:3]}, which its files do not hold")

    def fetch(name: str) -> Tensor:
        # A handle per tensor: safetensors maps the file, and a handle kept open keeps every page it has read mapped
        # (resident). Closed, only the returned tensor's pages stay, until the tensor is freed.
        with safe_open(str(files[name]), "pt") as handle:
            return handle.get_tensor(name)

    return TensorSource({name: metas[name] for name in files}, fetch)


def _pickle_source(files: dict[str, Path]) -> TensorSource:
    metas: dict[str, Tensor] = {}
    for file in dict.fromkeys(files.values()):
        metas.update({name: tensor.to("meta") for name, tensor in _load_pickle(file).items()})
    last: dict[Path, dict[str, Tensor]] = {}  # the file read last; more would keep their mapped pages resident

    def fetch(name: str) -> Tensor:
        if files[name] not in last:
            last.clear()
            last[files[name]] = _load_pickle(files[name])
        return last[files[name]][name]

    return TensorSource({name: metas[name] for name in files}, fetch)


def _load_pickle(file: Path) -> dict[str, Tensor]:
    # weights_only refuses anything but tensors and containers; mmap keeps the shard on disk until a tensor is used.
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _indexed_files(path: Path, index_name: str) -> dict[str, Path]:
    try:
        weight_map = json.loads((path / index_name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ModelLoadError(f"{path / index_name}: not a checkpoint index ({error})") from error
    return {name: path / file for name, file in weight_map.items()}


@dataclass(frozen=True)
class TensorGroup:
    """`targets` = `transform(*sources)`: a rename (one to one), a split (one to many) or a join (many to one)."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    transform: Callable[..., tuple[Tensor, ...]]

    def run(self, source: TensorSource, fetch: Callable[[str], Tensor] | None = None) -> dict[str, Tensor]:
        fetch = fetch or source.get
        outputs = self.transform(*(fetch(name) for name in self.sources))
        if len(outputs) != len(self.targets):
            raise ValueError(f"{self.sources} gave {len(outputs)} tensors for {len(self.targets)} targets")
        return dict(zip(self.targets, outputs, strict=True))


def write_shards(out_dir: Path, source: TensorSource, groups: list[TensorGroup], max_shard_bytes: int) -> list[Path]:
    """Write the groups' outputs as safetensors shards (+ index when more than one), streaming tensor by tensor."""
    shards = _plan_shards(source, groups, max_shard_bytes)
    names = [SAFETENSORS_SINGLE] if len(shards) == 1 else [
        f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (shard_groups, layout) in zip(names, shards, strict=True):
        _write_shard(out_dir / name, source, shard_groups, layout)
    if len(shards) > 1:
        weight_map = {tensor: name for name, (_, layout) in zip(names, shards, strict=True) for tensor in layout}
        total = sum(meta.numel() * meta.element_size() for _, layout in shards for meta in layout.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


def _plan_shards(source: TensorSource, groups: list[TensorGroup], max_shard_bytes: int):
    """[(groups, {name: meta tensor})] per shard: groups in order, a new shard when the next group would overflow."""
    shards: list[tuple[list[TensorGroup], dict[str, Tensor]]] = [([], {})]
    size = 0
    for group in groups:
        outputs = group.run(source, fetch=source.meta)
        group_bytes = sum(meta.numel() * meta.element_size() for meta in outputs.values())
        if shards[-1][0] and size + group_bytes > max_shard_bytes:
            shards.append(([], {}))
            size = 0
        shards[-1][0].append(group)
        shards[-1][1].update(outputs)
        size += group_bytes
    return shards


def _write_shard(file: Path, source: TensorSource, groups: list[TensorGroup], layout: dict[str, Tensor]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, meta in layout.items():
        end = offset + meta.numel() * meta.element_size()
        header[name] = {"dtype": DTYPE_NAMES[meta.dtype], "shape": list(meta.shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for group in groups:
            for name, tensor in group.run(source).items():
                expected = layout[name]
                if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
                    raise ValueError(f"{name}: computed {tuple(tensor.shape)} {tensor.dtype}, planned {expected}")
                # A uint8 view of the contiguous values: written without another copy.
                out.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
