"""Records -> training samples (token ids, labels, image tiles) and batches.

`SampleBuilder` is the whole per-sample pipeline: parse the row, check its placeholders, load and tile its images
(multi-image budget split, video frames, optional JPEG augmentation), tokenize with the chat template and expand the
image tokens. `SFTDataset` wraps it for a DataLoader; `collate` pads a batch; `model_inputs` moves it to the device.

Tiles travel as uint8 and are normalised on the device by `model_inputs`: a float32 sample at 7 tiles of 448 px is
17 MB, its uint8 tiles 4.2 MB, so workers, shared memory and the host-to-device copy move 4x less, and the worker
skips the float expansion (which dominated its time). The model only ever sees normalised `pixel_values`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from ivl.config import ConfigError
from ivl.data.chat import (
    IGNORE_INDEX,
    IMG_CONTEXT,
    Conversation,
    ConversationTokenizer,
    SampleError,
    insert_image_placeholders,
    resolve_template,
)
from ivl.data.filters import repetition_flags
from ivl.data.records import Record, iter_records, repeat_records, sources_for, to_conversation
from ivl.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    frames_to_tiles,
    image_to_tiles,
    normalize,
    num_tiles_for,
    open_image,
    sample_frame_indices,
    tiles_per_image,
    to_rgb,
)
from ivl.model.load import tile_size, tokens_per_tile
from ivl.options import DataConfig


class SampleBuilder:
    """The per-sample pipeline for one model (tile size and tokens per tile come from its config)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_config, data: DataConfig):
        self.data = data
        self.tile_size = tile_size(model_config)
        self.tokens_per_tile = tokens_per_tile(model_config)
        self.tokenize = ConversationTokenizer(
            tokenizer, resolve_template(data.template, tokenizer), self.tokens_per_tile
        )
        # The image token is whatever the checkpoint says (InternVL3: 151667, InternVL3.5: 151671): tokenizer and
        # model config must agree, or the image features would land nowhere.
        model_token = getattr(model_config, "image_token_id", None)
        if model_token is not None and model_token != self.tokenize.image_token_id:
            raise ConfigError(
                f"model.tokenizer: its {IMG_CONTEXT} is id {self.tokenize.image_token_id} but the model's config says "
                f"image_token_id {model_token}; use the checkpoint's own tokenizer"
            )

    def conversation(self, record: Record) -> Conversation:
        conversation = to_conversation(record)
        insert_image_placeholders(conversation)
        if self.data.drop_repetitive:
            replies = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
            flags = [flag for reply in replies for flag in repetition_flags(reply)]
            if flags:
                raise SampleError(f"repetitive text (data.drop_repetitive): {'; '.join(flags)}")
        return conversation

    def tile_bounds(self, record: Record, num_images: int) -> tuple[int, int]:
        """(min, max) tiles of each image: the dataset's max_dynamic_patch split among the sample's images."""
        budget = tiles_per_image(record.source.max_tiles or self.data.max_tiles, num_images)
        return min(self.data.min_tiles, budget), budget

    def _load(self, image: Any) -> Image.Image:
        return open_image(image, self.data.max_image_pixels) if isinstance(image, (str, Path)) else to_rgb(image)

    def _frames(self, conversation: Conversation) -> list[Image.Image]:
        indices = sample_frame_indices(len(conversation.video_frames), self.data.num_video_frames)
        return [self._load(conversation.video_frames[i]) for i in indices]

    def build(self, record: Record, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """One training sample. Raises `SampleError` / `ImageError` (without location) on a bad row."""
        conversation = self.conversation(record)
        tiles, num_tiles = self._tiles(record, conversation, rng)
        input_ids, labels = self.tokenize(conversation, num_tiles)
        self._check_length(input_ids, labels)
        return {"input_ids": input_ids, "labels": labels, "tiles": tiles, "num_tiles": num_tiles}

    def build_prompt(self, record: Record, thinking: bool | None = None) -> dict[str, Any]:
        """A generation prompt from a record: its conversation up to the last assistant reply, which becomes the
        `reference` answer (empty if the record has none). No augmentation. `thinking`: see
        `ConversationTokenizer.prompt`."""
        conversation = self.conversation(record)
        last = conversation.messages[-1] if conversation.messages else None
        reference = last["content"] if last and last["role"] == "assistant" else ""
        tiles, num_tiles = self._tiles(record, conversation, None, augment=False)
        input_ids = self.tokenize.prompt(conversation, num_tiles, thinking)
        return {"input_ids": input_ids, "tiles": tiles, "num_tiles": num_tiles, "reference": reference}

    def _tiles(
        self, record: Record, conversation: Conversation, rng: np.random.Generator | None, augment: bool | None = None
    ) -> tuple[torch.Tensor | None, list[int]]:
        """uint8 tiles [n, 3, S, S] of every image then every video frame (None without media), and the tile count
        of each image / frame."""
        low, high = self.tile_bounds(record, len(conversation.images))
        if augment is None:
            augment = record.source.data_augment if self.data.jpeg_augment is None else self.data.jpeg_augment
        chunks = [
            image_to_tiles(
                self._load(image),
                min_tiles=low,
                max_tiles=high,
                tile_size=self.tile_size,
                use_thumbnail=self.data.use_thumbnail,
                jpeg_augment=augment,
                rng=rng,
            )
            for image in conversation.images
        ]
        num_tiles = [chunk.shape[0] for chunk in chunks]
        if conversation.video_frames:
            frames = self._frames(conversation)
            conversation.video_frames = frames
            chunks.append(frames_to_tiles(frames, self.tile_size))
            num_tiles += [1] * len(frames)
        tiles = (chunks[0] if len(chunks) == 1 else torch.cat(chunks)) if chunks else None
        return tiles, num_tiles

    def build_indexed(self, record: Record, index: int) -> dict[str, Any] | None:
        """`build` as datasets call it: augmentation seeded by (seed, index), so it is reproducible across workers and
        resumes; a bad row raises with its `file:line`, or gives None under `on_error: skip`."""
        try:
            sample = self.build(record, np.random.default_rng([self.data.seed, index]))
        except (SampleError, ImageError) as error:
            if self.data.on_error == "skip":
                return None
            raise SampleError(f"{record.location}: {error}") from error
        return {**sample, "location": record.location}  # `file:line`, to name the rows of a diverging step

    def measure(self, record: Record) -> dict[str, Any]:
        """Token and tile counts of a sample, decoding every image once (to catch unreadable files) but not tiling."""
        conversation = self.conversation(record)
        low, high = self.tile_bounds(record, len(conversation.images))
        num_tiles = []
        for image in conversation.images:
            width, height = self._load(image).size
            num_tiles.append(num_tiles_for(width, height, low, high, self.tile_size, self.data.use_thumbnail))
        if conversation.video_frames:
            conversation.video_frames = self._frames(conversation)
            num_tiles += [1] * len(conversation.video_frames)
        if is_prompt_row(record.row, conversation):  # RL: the prompt is what gets built; the answer is sampled
            input_ids = self.tokenize.prompt(conversation, num_tiles)
            labels = torch.zeros_like(input_ids)  # nothing is supervised, and that is right for a prompt row
        else:
            input_ids, labels = self.tokenize(conversation, num_tiles)
        self._check_length(input_ids, labels)
        return {"num_tokens": len(input_ids), "num_tiles": sum(num_tiles), "conversation": conversation}

    def _check_length(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if len(input_ids) > self.data.max_length:
            raise SampleError(
                f"{len(input_ids)} tokens after image expansion, over max_length {self.data.max_length} "
                "(raise data.max_length or lower data.max_tiles)"
            )
        if not (labels != IGNORE_INDEX).any():
            raise SampleError("no supervised tokens (empty assistant replies)")


def is_prompt_row(row: dict[str, Any] | None, conversation: Conversation) -> bool:
    """An RL row: the conversation ends with a question and the row gives the reference in an `answer` field (rows
    whose last turn is the assistant's reply use that reply as the reference instead)."""
    messages = conversation.messages
    return isinstance(row, dict) and "answer" in row and bool(messages) and messages[-1]["role"] == "user"


def load_records(path: str | Path, seed: int = 0, image_root: str | Path | None = None) -> list[Record]:
    """All records behind a path, with each source's repeat_time applied (`image_root`: see `sources_for`)."""
    records: list[Record] = []
    for index, source in enumerate(sources_for(path, image_root)):
        rows = list(iter_records(source))
        records += repeat_records(rows, source.repeat_time, seed + index)
    return records


class SFTDataset(Dataset):
    """Map-style dataset of built samples. A bad row raises with its `file:line`, or gives None under
    `on_error: skip` (the collator drops and counts it)."""

    def __init__(self, records: list[Record], builder: SampleBuilder):
        self.records = records
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.builder.build_indexed(self.records[index], index)


def collate(samples: list[dict[str, Any] | None], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch: input_ids / labels / attention_mask [B, T]; sample_tokens [B, T] each row's supervised-target
    count (0 on padding; the loss weights 1/x^p read it); tiles uint8 [sum of tiles, 3, S, S] or None; locations the
    rows' `file:line`."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return {"num_skipped": len(samples), "input_ids": None}
    length = max(len(sample["input_ids"]) for sample in kept)
    input_ids = torch.full((len(kept), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(kept), length), dtype=torch.long)
    sample_tokens = torch.zeros((len(kept), length), dtype=torch.long)
    for row, sample in enumerate(kept):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
        sample_tokens[row, :n] = int((sample["labels"][1:] != IGNORE_INDEX).sum())
    tiles = [sample["tiles"] for sample in kept if sample["tiles"] is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "sample_tokens": sample_tokens,
        "tiles": torch.cat(tiles) if tiles else None,
        "num_tiles": [sample["num_tiles"] for sample in kept],
        "num_skipped": len(samples) - len(kept),
        "locations": [sample.get("location", "?") for sample in kept],
    }


def collate_prompts(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Left-pad generation prompts (so every row's next token is at the end): input_ids / attention_mask [B, T],
    tiles uint8 [sum of tiles, 3, S, S] or None, and the reference answers."""
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, length - n :] = sample["input_ids"]
        attention_mask[row, length - n :] = 1
    tiles = [sample["tiles"] for sample in samples if sample["tiles"] is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "tiles": torch.cat(tiles) if tiles else None,
        "references": [sample["reference"] for sample in samples],
    }


def model_inputs(
    batch: dict[str, Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> dict[str, torch.Tensor | None]:
    """The forward-pass arguments of a collated batch on `device`, tiles normalised there into `pixel_values`."""
    tiles = batch["tiles"]
    pixel_values = None
    if tiles is not None:
        pixel_values = normalize(tiles.to(device, non_blocking=True), mean, std).to(dtype)
    return {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
        **({"labels": batch["labels"].to(device, non_blocking=True)} if "labels" in batch else {}),
        "pixel_values": pixel_values,
    }
