"""Distillation data: images -> fixed-size tiles (uint8), from a folder, an InternVL jsonl / meta file, or the shapes
task generator.

    DistillDataConfig(train="images/")                 every image under the folder (recursive, sorted)
    DistillDataConfig(train="data/meta.json")          the images of an InternVL meta file or jsonl
    DistillDataConfig(train="shapes:train", max_images=2000)   generated shapes images (ivl.data.shapes)

Every image gives the tiles of `ivl.image.image_to_tiles` at the ViTs' tile size (the distillation recipe trains at a
fixed 448 px, docs/design/distillation.md: `max_tiles: 1`, the default, resizes each image to one tile); each tile is
one training item, in a fixed order, so item i is the same tile in online and offline runs. Tiles travel as uint8 and
are normalised on the device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ivl.config import ConfigError
from ivl.data.chat import SampleError
from ivl.data.records import DataSourceError, iter_records, sources_for, to_conversation
from ivl.data.shapes import make_sample
from ivl.distill.options import SHAPES_PREFIX, DistillDataConfig
from ivl.image import image_to_tiles, num_tiles_for, open_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
ImageRef = str | tuple[str, int]  # a file path, or (shapes split, sample index)


def list_images(spec: str, limit: int) -> list[ImageRef]:
    """The images behind a data spec, in a fixed order (at most `limit`, 0: all)."""
    if spec.startswith(SHAPES_PREFIX):
        split = spec[len(SHAPES_PREFIX) :]
        if split not in ("train", "validation"):
            raise ConfigError(f"{spec}: the shapes splits are shapes:train and shapes:validation")
        return [(split, index) for index in range(limit)]
    path = Path(spec)
    if path.is_dir():
        images = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif path.is_file():
        images = _annotation_images(spec)
    else:
        raise DataSourceError(f"{spec}: no such folder or annotation file")
    if not images:
        raise DataSourceError(f"{spec}: no images found")
    return images[:limit] if limit else images


def _annotation_images(spec: str) -> list[str]:
    images = []
    for source in sources_for(spec):
        for record in iter_records(source):
            try:
                paths = to_conversation(record).images
            except SampleError as error:
                raise DataSourceError(f"{record.location}: {error}") from error
            for image in paths:
                if not isinstance(image, str):
                    raise DataSourceError(f"{record.location}: images embedded in the data are not supported here; "
                                          "write them to files and point the jsonl at them")  # fmt: skip
                images.append(image)
    return images


class TileDataset(Dataset):
    """Item i = one tile of one image: {"pixels": uint8 [3, S, S], "index": i}."""

    def __init__(self, images: list[ImageRef], tile_size: int, data: DistillDataConfig):
        self.tile_size = tile_size
        self.data = data
        self.items = [(image, tile) for image in images for tile in range(self._num_tiles(image))]
        self._last: tuple[ImageRef, Tensor] | None = None  # consecutive items of one image are tiled once

    def _num_tiles(self, image: ImageRef) -> int:
        if self.data.max_tiles == 1:
            return 1
        if isinstance(image, tuple):
            width = height = self.data.shapes_size
        else:
            with Image.open(image) as handle:  # the header only
                width, height = handle.size
        return num_tiles_for(width, height, 1, self.data.max_tiles, self.tile_size, self.data.use_thumbnail)

    def __len__(self) -> int:
        return len(self.items)

    def tiles_of(self, image: ImageRef) -> Tensor:
        if self._last is None or self._last[0] != image:
            if isinstance(image, tuple):
                picture = make_sample(image[0], image[1], self.data.shapes_size, self.data.shapes_size).image
            else:
                picture = open_image(image)
            tiles = image_to_tiles(picture, max_tiles=self.data.max_tiles, tile_size=self.tile_size,
                                   use_thumbnail=self.data.use_thumbnail)  # fmt: skip
            self._last = (image, tiles)
        return self._last[1]

    def source(self, index: int) -> str:
        """Where item `index` comes from, for messages: `PATH tile T` or `shapes:SPLIT #I tile T`."""
        image, tile = self.items[index]
        return f"{image if isinstance(image, str) else f'shapes:{image[0]} #{image[1]}'} tile {tile}"

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, tile = self.items[index]
        return {"pixels": self.tiles_of(image)[tile], "index": torch.tensor(index)}


def collate(items: list[dict]) -> dict:
    """Stack items; nested dicts / lists of tensors (cached teacher targets) are stacked leaf by leaf."""

    def stack(values: list):
        first = values[0]
        if isinstance(first, dict):
            return {key: stack([value[key] for value in values]) for key in first}
        if isinstance(first, list):
            return [stack([value[i] for value in values]) for i in range(len(first))]
        return torch.stack(values)

    return stack(items)
