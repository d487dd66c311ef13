"""Preference pairs (docs/guides/data.md, docs/design/mpo.md): InternVL MPO jsonl and TRL's preference layout -> chosen
/ rejected samples.

    InternVL MPO line:  {"image": "a.jpg" | [...] | absent, "question": "...", "chosen": "...", "rejected": "..."}
    TRL preference row: {"prompt": str | messages, "chosen": str | messages, "rejected": ..., "images": [...]}

Each side of a pair is rewritten as an ordinary SFT row (InternVL `conversations` or TRL `messages` layout) with the
same location and source, so `SampleBuilder` does everything it does for SFT: placeholder checks, tiling, the chat
template, labels only on the answer, length checks. Both answers share the prompt and the image: the tiles are built
once, on the chosen side, and the rejected side reuses their count.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ivl.data.chat import SampleError
from ivl.data.records import Record
from ivl.data.samples import SampleBuilder, collate
from ivl.image import ImageError

ANSWER_KEYS = ("chosen", "rejected")


def is_preference_row(row: dict[str, Any] | None) -> bool:
    return isinstance(row, dict) and all(key in row for key in ANSWER_KEYS)


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SampleError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _internvl_side(row: dict[str, Any], answer: str) -> dict[str, Any]:
    turns = [{"from": "human", "value": _text(row, "question")}, {"from": "gpt", "value": answer}]
    return {"conversations": turns, **{key: row[key] for key in ("image", "system") if row.get(key) is not None}}


def _as_messages(value: Any, role: str, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str) and value.strip():
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return value
    raise SampleError(f"'{key}' must be a non-empty string or a list of messages, got {value!r}")


def _trl_side(row: dict[str, Any], key: str) -> dict[str, Any]:
    messages = _as_messages(row["prompt"], "user", "prompt") + _as_messages(row[key], "assistant", key)
    return {"messages": messages, **({"images": row["images"]} if row.get("images") is not None else {})}


def pair_records(record: Record) -> tuple[Record, Record]:
    """(chosen, rejected) SFT records of a preference record. Raises `SampleError` (without location) on a bad row."""
    if record.error is not None:
        raise SampleError(record.error)
    row = record.row
    if not is_preference_row(row):
        raise SampleError("a preference row needs 'chosen' and 'rejected' (and 'question' or 'prompt')")
    if row["chosen"] == row["rejected"]:
        raise SampleError("'chosen' and 'rejected' are the same answer: nothing to prefer")
    if "question" in row:
        sides = [_internvl_side(row, _text(row, key)) for key in ANSWER_KEYS]
    elif "prompt" in row:
        sides = [_trl_side(row, key) for key in ANSWER_KEYS]
    else:
        raise SampleError("no 'question' (InternVL MPO layout) or 'prompt' (TRL preference layout) field")
    chosen, rejected = (replace(record, row=side) for side in sides)
    return chosen, rejected


def build_pair(builder: SampleBuilder, record: Record, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """{"chosen": sample, "rejected": sample}: token ids and labels of both; the tiles only on the chosen side."""
    chosen_record, rejected_record = pair_records(record)
    chosen = builder.build(chosen_record, rng)
    rejected_ids, rejected_labels = builder.tokenize(builder.conversation(rejected_record), chosen["num_tiles"])
    builder._check_length(rejected_ids, rejected_labels)
    rejected = {"input_ids": rejected_ids, "labels": rejected_labels, "tiles": None, "num_tiles": chosen["num_tiles"]}
    return {"chosen": chosen, "rejected": rejected}


def measure_pair(builder: SampleBuilder, record: Record) -> dict[str, Any]:
    """`SampleBuilder.measure` for a preference record (what `ivl data check` reports): the longer side's tokens."""
    chosen_record, rejected_record = pair_records(record)
    chosen, rejected = builder.measure(chosen_record), builder.measure(rejected_record)
    return chosen if chosen["num_tokens"] >= rejected["num_tokens"] else rejected


class PairDataset(Dataset):
    """Map-style dataset of preference pairs, built like `SFTDataset` (augmentation seeded by (seed, index), a bad row
    raises with its `file:line` or gives None under `on_error: skip`). Each item carries its dataset `index`, the key
    of precomputed reference log-probs."""

    def __init__(self, records: list[Record], builder: SampleBuilder):
        self.records = records
        self.builder = builder
        self.num_left_out = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        try:
            pair = build_pair(self.builder, record, np.random.default_rng([self.builder.data.seed, index]))
        except (SampleError, ImageError) as error:
            if self.builder.data.on_error == "skip":
                return None
            raise SampleError(f"{record.location}: {error}") from error
        return {**pair, "index": index, "location": record.location}


def collate_pairs(pairs: list[dict[str, Any] | None], pad_token_id: int) -> dict[str, Any]:
    """B pairs -> one padded batch of 2B rows, [chosen_1..chosen_B, rejected_1..rejected_B] (input_ids / labels /
    attention_mask [2B, T]); `tiles` [tiles of the B pairs, 3, S, S] once, for the chosen rows' image tokens; `indices`
    the pairs' dataset indices, `locations` their `file:line`."""
    kept = [pair for pair in pairs if pair is not None]
    batch = collate([p["chosen"] for p in kept] + [p["rejected"] for p in kept], pad_token_id)
    batch["num_skipped"] = len(pairs) - len(kept)
    batch["indices"] = [pair["index"] for pair in kept]
    batch["locations"] = [pair["location"] for pair in kept]
    return batch
