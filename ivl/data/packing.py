"""Multimodal packing (InternVL 2.5; docs/design/packing.md): several samples in one sequence under a token and a tile
budget.

    packer = Packer(PackBudget(max_tokens=8192, max_tiles=48, buffer_size=64), image_start_id, image_end_id)
    for position, sample in source:
        for pack in packer.add(position, sample):   # a pack is a list of `PackItem`s (samples or pieces)
            ...
    packs_left = packer.flush()

select: a sample that alone exceeds a budget is split into independent pieces that fit, never inside
`<img>...</img>`. search: the buffer of unfinished packs is kept sorted by (tokens, tiles); the longest entry that
still fits with the incoming item is merged into it, as long as one fits. maintain: a pack that fills a budget is
emitted; when the buffer outgrows `buffer_size`, its longest entry is emitted. The buffer is small (`buffer_size`
packs) and described by item keys only, so `state()` / `restore()` checkpoint it without tensors.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ivl.data.chat import IGNORE_INDEX, SampleError


@dataclass(frozen=True)
class PackBudget:
    max_tokens: int  # L_max: tokens of one packed sequence
    max_tiles: int  # T_max: image tiles of one packed sequence (the ViT's batch for it)
    buffer_size: int  # unfinished packs kept while searching for a fit


@dataclass(frozen=True)
class PackItem:
    """A sample, or one piece of a sample over a budget, as it goes into a pack."""

    position: int  # the sample's position in the source (its dataset index or stream row)
    piece: int  # 0 for a whole sample, else the piece's number
    sample: dict[str, Any]  # input_ids [n], labels [n], tiles uint8 [t, 3, S, S] | None, num_tiles per image
    # Supervised targets of the whole original sample: what its loss weight 1/x^p uses (docs/design/loss_reweighting.md)
    weight_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.sample["input_ids"])

    @property
    def num_tiles(self) -> int:
        return sum(self.sample["num_tiles"])


def supervised_targets(labels: torch.Tensor) -> int:
    """Next-token targets of one unshifted label row [n] (the first token is never a target)."""
    return int((labels[1:] != IGNORE_INDEX).sum())


def image_spans(input_ids: torch.Tensor, image_start_id: int, image_end_id: int) -> list[tuple[int, int]]:
    """[(start, end)) of every `<img>...</img>` in token order (`end` one past `</img>`)."""
    starts = (input_ids == image_start_id).nonzero().flatten().tolist()
    ends = (input_ids == image_end_id).nonzero().flatten().tolist()
    if len(starts) != len(ends) or any(end < start for start, end in zip(starts, ends, strict=True)):
        raise SampleError("unbalanced <img> / </img> markers: cannot split this sample between images")
    return [(start, end + 1) for start, end in zip(starts, ends, strict=True)]


def split_sample(
    sample: dict[str, Any], budget: PackBudget, image_start_id: int, image_end_id: int
) -> list[dict[str, Any]]:
    """Cut a sample into consecutive pieces of <= max_tokens tokens and <= max_tiles tiles, only between images.

    Each piece is trained as an independent sequence: a later piece does NOT see the earlier pieces (its positions
    restart at 0 and attention stays inside it), so its context is only its own tokens. Pieces keep their labels,
    except that a piece's first token has no prediction before it (as for any sequence). The k-th `<img>` span owns
    the k-th entry of `num_tiles`, the order in which the model itself matches image features to tokens.
    """
    input_ids, num_tiles = sample["input_ids"], sample["num_tiles"]
    spans = image_spans(input_ids, image_start_id, image_end_id)
    if len(spans) != len(num_tiles):
        raise SampleError(f"{len(spans)} <img> spans but {len(num_tiles)} images: cannot split this sample")
    tile_offsets = [0]
    for count in num_tiles:
        tile_offsets.append(tile_offsets[-1] + count)
    pieces, start, image = [], 0, 0  # `image`: the first image not yet in a piece
    while start < len(input_ids):
        end, last_image = min(start + budget.max_tokens, len(input_ids)), image
        while last_image < len(spans) and spans[last_image][1] <= end:
            last_image += 1
        if last_image < len(spans) and spans[last_image][0] < end:
            end = spans[last_image][0]  # the cut would fall inside this image: stop before it
        while last_image > image and tile_offsets[last_image] - tile_offsets[image] > budget.max_tiles:
            last_image -= 1
            end = spans[last_image][0]  # too many tiles: leave the later images to the next piece
        if end <= start:
            span_tokens = spans[image][1] - spans[image][0]
            raise SampleError(
                f"an image of {num_tiles[image]} tiles ({span_tokens} tokens) does not fit a pack "
                f"(data.pack_max_tokens={budget.max_tokens}, data.pack_max_tiles={budget.max_tiles}): raise them or "
                "lower data.max_tiles"
            )
        tiles = sample["tiles"][tile_offsets[image] : tile_offsets[last_image]] if last_image > image else None
        pieces.append(
            {
                "input_ids": input_ids[start:end],
                "labels": sample["labels"][start:end],
                "tiles": tiles,
                "num_tiles": list(num_tiles[image:last_image]),
                "location": sample.get("location", "?"),
            }
        )
        start, image = end, last_image
    return pieces


def _key(entry: list[PackItem]) -> tuple[int, int]:
    return sum(item.num_tokens for item in entry), sum(item.num_tiles for item in entry)


class Packer:
    """select / search / pack / maintain over a bounded buffer of unfinished packs (see the module docstring)."""

    def __init__(self, budget: PackBudget, image_start_id: int, image_end_id: int):
        self.budget = budget
        self.image_start_id = image_start_id
        self.image_end_id = image_end_id
        self.buffer: list[list[PackItem]] = []  # sorted by _key: (tokens, tiles)
        self.keys: list[tuple[int, int]] = []

    def items(self, position: int, sample: dict[str, Any]) -> list[PackItem]:
        """select: the sample as one item, or its pieces when it exceeds a budget."""
        weight_tokens = supervised_targets(sample["labels"])
        if len(sample["input_ids"]) <= self.budget.max_tokens and sum(sample["num_tiles"]) <= self.budget.max_tiles:
            return [PackItem(position, 0, sample, weight_tokens)]
        pieces = split_sample(sample, self.budget, self.image_start_id, self.image_end_id)
        return [PackItem(position, index + 1, piece, weight_tokens) for index, piece in enumerate(pieces)]

    def add(self, position: int, sample: dict[str, Any]) -> list[list[PackItem]]:
        """Take one source sample; returns the packs this completes (often none)."""
        packs = []
        for item in self.items(position, sample):
            packs += self._add_entry([item])
        return packs

    def _add_entry(self, entry: list[PackItem]) -> list[list[PackItem]]:
        tokens, tiles = _key(entry)
        # search: the longest buffered entry that still fits beside this one, merged in until none fits.
        while (found := self._longest_fit(self.budget.max_tokens - tokens, self.budget.max_tiles - tiles)) is not None:
            entry = self._pop(found) + entry
            tokens, tiles = _key(entry)
        if tokens >= self.budget.max_tokens or tiles >= self.budget.max_tiles:
            return [entry]  # maintain: a full budget
        index = bisect.bisect(self.keys, (tokens, tiles))
        self.keys.insert(index, (tokens, tiles))
        self.buffer.insert(index, entry)
        if len(self.buffer) > self.budget.buffer_size:
            return [self._pop(len(self.buffer) - 1)]  # maintain: the buffer is full, emit its longest entry
        return []

    def _longest_fit(self, room_tokens: int, room_tiles: int) -> int | None:
        index = bisect.bisect(self.keys, (room_tokens, room_tiles + 1)) - 1  # last entry with tokens <= room
        while index >= 0:
            if self.keys[index][1] <= room_tiles:
                return index
            index -= 1
        return None

    def _pop(self, index: int) -> list[PackItem]:
        self.keys.pop(index)
        return self.buffer.pop(index)

    def flush(self) -> list[list[PackItem]]:
        """The unfinished packs, longest first (at the end of a finite source)."""
        packs = self.buffer[::-1]
        self.buffer, self.keys = [], []
        return packs

    def state(self) -> list[list[list[int]]]:
        """The buffer as [[position, piece], ...] per unfinished pack: JSON, no tensors."""
        return [[[item.position, item.piece] for item in entry] for entry in self.buffer]

    def rebuild(
        self, entries: list[list[list[int]]], build: Callable[[int], dict[str, Any] | None]
    ) -> list[list[PackItem]]:
        """Packs described as in `state()`, rebuilt with `build(position)` (samples are reproducible from their
        position: augmentation is seeded by it)."""
        items: dict[int, dict[int, PackItem]] = {}
        packs = []
        for entry in entries:
            for position, _ in entry:
                if position not in items:
                    sample = build(position)
                    if sample is None:
                        raise SampleError(f"sample {position} of the saved packing state cannot be built any more")
                    items[position] = {item.piece: item for item in self.items(position, sample)}
            packs.append([items[position][piece] for position, piece in entry])
        return packs

    def restore(self, state: list[list[list[int]]], build: Callable[[int], dict[str, Any] | None]) -> None:
        """Put back the buffer of `state()`."""
        self.buffer = sorted(self.rebuild(state, build), key=_key)  # state() is sorted already; sorted() is stable
        self.keys = [_key(entry) for entry in self.buffer]


def collate_packs(packs: list[list[PackItem]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad packs into a batch, each item an isolated sub-sample:

    input_ids / labels / attention_mask / position_ids / segment_ids / sample_tokens [B, T]. Position ids restart at
    0 for every item (and for the padding tail, which so forms its own segment that no label reads); the label of each
    item's first token is IGNORE_INDEX, so no target crosses from one item into the next. segment_ids numbers the items
    of the batch (-1 on padding); sample_tokens holds each item's `weight_tokens` (0 on padding). tiles uint8
    [sum of tiles, 3, S, S] or None, in token order; locations the source rows' `file:line` (once each).
    """
    length = max(sum(item.num_tokens for item in pack) for pack in packs)
    shape = (len(packs), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    sample_tokens = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    tiles, num_tiles, segment = [], [], 0
    for row, pack in enumerate(packs):
        start = 0
        for item in pack:
            end = start + item.num_tokens
            input_ids[row, start:end] = item.sample["input_ids"]
            labels[row, start + 1 : end] = item.sample["labels"][1:]
            attention_mask[row, start:end] = 1
            position_ids[row, start:end] = torch.arange(item.num_tokens)
            segment_ids[row, start:end] = segment
            sample_tokens[row, start:end] = item.weight_tokens
            if item.sample["tiles"] is not None:
                tiles.append(item.sample["tiles"])
            num_tiles.append(item.sample["num_tiles"])
            start, segment = end, segment + 1
        position_ids[row, start:] = torch.arange(length - start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "sample_tokens": sample_tokens,
        "tiles": torch.cat(tiles) if tiles else None,
        "num_tiles": num_tiles,
        "num_skipped": 0,
        "locations": list(dict.fromkeys(item.sample.get("location", "?") for pack in packs for item in pack)),
    }


def collate_padding_free(samples: list[dict[str, Any] | None], pad_token_id: int) -> dict[str, Any]:
    """A micro-batch's samples in one row, each an isolated sub-sample (`collate_packs` of a single pack): the same
    samples per step as `ivl.data.samples.collate`, without its padding, so no padded position is computed. Rows the
    builder skipped (None) are counted in `num_skipped` as `collate` does."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return {"num_skipped": len(samples), "input_ids": None}
    pack = [PackItem(index, 0, sample, supervised_targets(sample["labels"])) for index, sample in enumerate(kept)]
    return {**collate_packs([pack], pad_token_id), "num_skipped": len(samples) - len(kept)}

