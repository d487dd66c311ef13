"""Offline teacher features: `ivl distill cache` writes them once, offline training reads them with no teacher.

    CACHE/train/cache.json               what was cached (teacher, layers, dtype, PCA, token subsampling, data)
    CACHE/train/pca.safetensors          per layer: mean [D] and components [D, d] (only with pca_dims)
    CACHE/train/shard-00000.safetensors  tiles [i0, i0 + shard_tiles):
        pixels        uint8 [n, 3, S, S]     the exact tile the teacher saw, so the student sees the same one
                                             (with store_pixels: false the tiles are cut again from the same images,
                                             which tiling does deterministically; the manifest's data hash checks
                                             that the image list is the same, not that the files are unchanged)
        token_index   int32 [n, T']          the patch tokens kept (only with patch_tokens)
        layer{L}.patch [n, T', d]            teacher layer L's patch tokens (PCA codes with pca_dims), in `dtype`
        layer{L}.cls   [n, d]
        layer{L}.patch_scale, layer{L}.cls_scale   fp32 per-token scales (only for float8_e4m3fn)
    CACHE/validation/...                 the same for data.validation

One InternViT-6B layer map is 1025 x 3200 x 2 B = 6.6 MB per tile in bf16 (docs/design/distillation.md): `pca_dims`,
`patch_tokens` and `float8_e4m3fn` shrink it; a stored 448 px tile is another 0.6 MB (`store_pixels: false` leaves it
out). Shards are written atomically (temp file + rename) in item order, and a rerun with the same settings skips the
finished ones, so an interrupted cache run resumes; different settings are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from ivl.config import ConfigError
from ivl.distill.data import TileDataset
from ivl.distill.models import hidden_states
from ivl.distill.options import CacheConfig
from ivl.image import normalize
from ivl.model.tensor_io import SAFETENSORS_DTYPES

CACHE_VERSION = 1
MANIFEST = "cache.json"
PCA_FILE = "pca.safetensors"
FP8_MAX = 448.0  # largest float8_e4m3fn value: per-token scales map each token's absmax onto it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8_e4m3fn": torch.float8_e4m3fn}  # fmt: skip


def data_fingerprint(dataset: TileDataset) -> str:
    """A hash of the item list (image references and tile numbers): a resumed cache must cover the same tiles."""
    return hashlib.sha256(json.dumps([[str(image), tile] for image, tile in dataset.items]).encode()).hexdigest()


def make_manifest(cache: CacheConfig, teacher_name: str, teacher_config, layers: list[int], dataset: TileDataset):
    return {
        "version": CACHE_VERSION,
        "teacher": teacher_name,
        "teacher_num_layers": teacher_config.num_hidden_layers,
        "teacher_width": teacher_config.hidden_size,
        "image_size": dataset.tile_size,
        "layers": layers,
        "num_items": len(dataset),
        "data": data_fingerprint(dataset),
        **{key: value for key, value in asdict(cache).items() if key not in ("dir", "batch_size")},
    }


def kept_tokens(index: int, num_patches: int, keep: int, seed: int) -> Tensor:
    """The sorted patch-token indices kept for item `index` (a pure function of index and seed)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randperm(num_patches, generator=generator)[:keep].sort().values


def encode(x: Tensor, dtype: torch.dtype, name: str) -> dict[str, Tensor]:
    """Features [..., d] -> stored tensors; float8 gets a per-token scale (absmax -> FP8_MAX)."""
    if dtype != torch.float8_e4m3fn:
        return {name: x.to(dtype).contiguous()}
    scale = x.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return {name: (x / scale.unsqueeze(-1)).to(dtype).contiguous(), f"{name}_scale": scale.float().contiguous()}


def decode(stored: dict[str, Tensor], name: str) -> Tensor:
    x = stored[name]
    if x.dtype == torch.float8_e4m3fn:
        return x.float() * stored[f"{name}_scale"].unsqueeze(-1)
    return x


@torch.no_grad()
def fit_pca(teacher, dataset: TileDataset, layers: list[int], cache: CacheConfig, device) -> dict[str, Tensor]:
    """Per layer: mean [D] and top-`pca_dims` components [D, d] of its tokens (patch and CLS) over the first
    `pca_fit_tiles` tiles, from streamed sums (one D x D matrix in float64, not the tokens)."""
    count, sums, products = 0, {}, {}
    for start in range(0, min(cache.pca_fit_tiles, len(dataset)), cache.batch_size):
        stop = min(start + cache.batch_size, cache.pca_fit_tiles, len(dataset))
        pixels = torch.stack([dataset[i]["pixels"] for i in range(start, stop)]).to(device)
        states = hidden_states(teacher, normalize(pixels), layers)
        for layer, state in states.items():
            tokens = state.reshape(-1, state.shape[-1]).double()  # [tiles * (1 + patches), D]
            sums[layer] = sums.get(layer, 0) + tokens.sum(0)
            products[layer] = products.get(layer, 0) + tokens.T @ tokens
        count += len(pixels) * next(iter(states.values())).shape[1]
    pca = {}
    for layer in layers:
        mean = sums[layer] / count
        covariance = products[layer] / count - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(covariance)  # ascending
        pca[f"layer{layer}.mean"] = mean.float().cpu()
        pca[f"layer{layer}.components"] = vectors[:, -cache.pca_dims :].flip(-1).float().contiguous().cpu()
        pca[f"layer{layer}.explained"] = (values[-cache.pca_dims :].sum() / values.sum()).float().reshape(1).cpu()
    return pca


@torch.no_grad()
def shard_tensors(teacher, dataset: TileDataset, items: range, layers: list[int], cache: CacheConfig,
                  pca: dict[str, Tensor], device) -> dict[str, Tensor]:  # fmt: skip
    """The stored tensors of one shard (items in order)."""
    dtype, parts = DTYPES[cache.dtype], []
    for start in range(items.start, items.stop, cache.batch_size):
        indices = range(start, min(start + cache.batch_size, items.stop))
        pixels = torch.stack([dataset[i]["pixels"] for i in indices])
        states = hidden_states(teacher, normalize(pixels.to(device)), layers)
        out = {"pixels": pixels} if cache.store_pixels else {}
        num_patches = next(iter(states.values())).shape[1] - 1
        index = None
        if cache.patch_tokens and cache.patch_tokens < num_patches:
            index = torch.stack([kept_tokens(i, num_patches, cache.patch_tokens, cache.seed) for i in indices])
            out["token_index"] = index.int()
        for layer, state in states.items():
            state = state.float()
            patch, cls = state[:, 1:], state[:, 0]
            if index is not None:
                patch = patch.gather(1, index.to(device).unsqueeze(-1).expand(-1, -1, patch.shape[-1]))
            if pca:
                mean, components = pca[f"layer{layer}.mean"].to(device), pca[f"layer{layer}.components"].to(device)
                patch, cls = (patch - mean) @ components, (cls - mean) @ components
            out |= encode(patch.cpu(), dtype, f"layer{layer}.patch") | encode(cls.cpu(), dtype, f"layer{layer}.cls")
        parts.append(out)
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def shard_path(root: Path, shard: int) -> Path:
    return root / f"shard-{shard:05d}.safetensors"


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)  # a shard is complete or absent, never half-written


def open_manifest(root: Path, manifest: dict) -> None:
    """Write the manifest of a new cache, or check that an existing one was written with the same settings."""
    existing = root / MANIFEST
    if existing.is_file():
        old = json.loads(existing.read_text())
        changed = sorted(key for key in manifest.keys() | old.keys() if old.get(key) != manifest.get(key))
        if changed:
            raise ConfigError(f"{root} holds a cache written with other settings ({', '.join(changed)} differ): "
                              "use another cache.dir or delete it")  # fmt: skip
        return
    root.mkdir(parents=True, exist_ok=True)
    existing.write_text(json.dumps(manifest, indent=2) + "\n")


def write_cache(teacher, teacher_name: str, dataset: TileDataset, root: Path, layers: list[int], cache: CacheConfig,
                device, pca_from: Path | None = None, progress=None) -> dict:  # fmt: skip
    """Cache the teacher's `layers` for every tile of `dataset` under `root`; returns the manifest. Finished shards
    are kept (resume). `pca_from`: another cache's PCA to use (held-out tiles use the training tiles' projection)
    instead of fitting one; `progress(shards_done, shards_total)` is called after each shard."""
    manifest = make_manifest(cache, teacher_name, teacher.config, layers, dataset)
    open_manifest(root, manifest)
    pca = {}
    if cache.pca_dims:
        if not (root / PCA_FILE).is_file():
            fitted = load_file(pca_from / PCA_FILE) if pca_from else fit_pca(teacher, dataset, layers, cache, device)
            _save_atomic(fitted, root / PCA_FILE)
        pca = load_file(root / PCA_FILE)
    num_shards = -(-len(dataset) // cache.shard_tiles)
    for shard in range(num_shards):
        if not shard_path(root, shard).is_file():
            items = range(shard * cache.shard_tiles, min((shard + 1) * cache.shard_tiles, len(dataset)))
            _save_atomic(shard_tensors(teacher, dataset, items, layers, cache, pca, device), shard_path(root, shard))
        if progress is not None:
            progress(shard + 1, num_shards)
    return manifest


def feature_bytes_per_tile(root: Path) -> float:
    """Bytes stored per tile for the teacher's features (codes, scales, token indices; not the tile's pixels)."""
    total, rows = 0, 0
    with safe_open(str(shard_path(root, 0)), "pt") as handle:
        for name in handle.keys():
            piece = handle.get_slice(name)
            shape = piece.get_shape()
            rows = shape[0]
            if name != "pixels":
                total += math.prod(shape) * SAFETENSORS_DTYPES[piece.get_dtype()].itemsize
    return total / rows


class CachedTiles(Dataset):
    """Item i of a cache: {"pixels", "index", "stored": {name: tensor}} (fp8 already scaled back to fp32; PCA codes
    are decoded on the device by `CachedTargets`). `tiles`: the dataset the cache was written from, needed when it
    holds no pixels."""

    def __init__(self, root: str | Path, tiles: TileDataset | None = None):
        self.root = Path(root)
        self.tiles = tiles
        if not (self.root / MANIFEST).is_file():
            raise ConfigError(f"{self.root}: no {MANIFEST}; write the cache first (ivl distill cache CONFIG)")
        self.manifest = json.loads((self.root / MANIFEST).read_text())
        missing = [
            s for s in range(-(-len(self) // self.manifest["shard_tiles"])) if not shard_path(self.root, s).is_file()
        ]
        if missing:
            raise ConfigError(f"{self.root}: shard {missing[0]} is missing; finish the cache (rerun ivl distill cache)")
        self.pca = load_file(self.root / PCA_FILE) if self.manifest["pca_dims"] else {}
        if not self.manifest["store_pixels"]:
            if tiles is None or data_fingerprint(tiles) != self.manifest["data"]:
                raise ConfigError(f"{self.root} holds no tiles (cache.store_pixels=false) and the data config does not "
                                  "give the images it was written from: use the same data settings")  # fmt: skip

    def __len__(self) -> int:
        return self.manifest["num_items"]

    def source(self, index: int) -> str:
        """Where item `index` comes from, for messages: its image and tile when known, else its place in the cache."""
        return self.tiles.source(index) if self.tiles is not None else f"{self.root} item {index}"

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(index, self.manifest["shard_tiles"])
        with safe_open(str(shard_path(self.root, shard)), "pt") as handle:
            stored = {name: handle.get_slice(name)[row] for name in handle.keys()}
        pixels = stored.pop("pixels") if "pixels" in stored else self.tiles[index]["pixels"]
        names = [name for name in stored if not name.endswith("_scale")]
        return {"pixels": pixels, "index": torch.tensor(index), "stored": {n: decode(stored, n) for n in names}}


class CachedTargets:
    """Teacher targets from a cached batch: PCA codes are mapped back to the teacher's width (x = codes @ P^T + mean),
    so the loss is the online one against the rank-d reconstruction. Called like `TeacherTargets`."""

    def __init__(self, pca: dict[str, Tensor], layers: list[int], device):
        self.pca = {name: tensor.to(device) for name, tensor in pca.items()}
        self.layers = layers
        self.device = device

    def __call__(self, batch: dict, pixel_values: Tensor) -> tuple[list[dict[str, Tensor]], Tensor | None]:
        stored = {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch["stored"].items()}
        targets = []
        for layer in self.layers:
            target = {part: stored[f"layer{layer}.{part}"].float() for part in ("patch", "cls")}
            if self.pca:
                mean, components = self.pca[f"layer{layer}.mean"], self.pca[f"layer{layer}.components"]
                target = {part: value @ components.T + mean for part, value in target.items()}
            targets.append(target)
        return targets, stored.get("token_index")
