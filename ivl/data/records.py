"""Reading training data into records: InternVL jsonl + meta files, and HF datasets in TRL's layout
(docs/guides/data.md).

A `Record` is one raw row plus where it came from (`file:line`), the directory its media paths are relative to and
the per-dataset settings of the meta file. Reading never decodes images; `to_conversation` turns a record into a
`Conversation` and says exactly what is wrong with a bad one.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ivl.data.chat import Conversation, SampleError, normalise_role
from ivl.errors import DataSourceError  # noqa: F401  re-exported

META_KEYS = {"root", "annotation", "data_augment", "repeat_time", "length", "max_dynamic_patch"}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")  # files read as data; a folder is a saved dataset


@dataclass
class DataSource:
    """One dataset of a meta file (or a lone jsonl / HF dataset)."""

    name: str
    annotation: str
    root: Path
    data_augment: bool = False
    repeat_time: float = 1.0
    max_tiles: int | None = None  # the meta file's max_dynamic_patch


@dataclass
class Record:
    location: str  # "file.jsonl:12" or "dataset[12]": where a person finds this row
    row: dict[str, Any] | None
    source: DataSource
    error: str | None = None  # set when the row itself could not be parsed (bad JSON, not an object)


def is_meta_file(path: Path) -> bool:
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark is not an error
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(content, dict) and all(isinstance(v, dict) and "annotation" in v for v in content.values())


def read_meta(path: str | Path) -> list[DataSource]:
    """Parse an InternVL meta file: `{name: {root, annotation, data_augment, repeat_time, length, ...}}`."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataSourceError(f"{path}: cannot read the meta file: {error}") from error
    if not isinstance(content, dict) or not content:
        raise DataSourceError(f"{path}: a meta file maps dataset names to settings; got {type(content).__name__}")
    sources = []
    for name, entry in content.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise DataSourceError(f"{where}: needs at least an 'annotation' file")
        unknown = set(entry) - META_KEYS
        if unknown:
            raise DataSourceError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(META_KEYS)}")
        annotation = Path(entry["annotation"])
        annotation = annotation if annotation.is_absolute() else path.parent / annotation
        root = Path(entry.get("root") or annotation.parent)
        root = root if root.is_absolute() else path.parent / root
        repeat_time = entry.get("repeat_time", 1)
        if not isinstance(repeat_time, (int, float)) or repeat_time <= 0:
            raise DataSourceError(f"{where}: repeat_time must be a positive number, got {repeat_time!r}")
        max_tiles = entry.get("max_dynamic_patch")
        if max_tiles is not None and (not isinstance(max_tiles, int) or max_tiles < 1):
            raise DataSourceError(f"{where}: max_dynamic_patch must be a positive integer, got {max_tiles!r}")
        sources.append(
            DataSource(
                name, str(annotation), root, bool(entry.get("data_augment", False)), float(repeat_time), max_tiles
            )
        )
    return sources


def sources_for(path: str | Path, image_root: str | Path | None = None) -> list[DataSource]:
    """The data sources behind a path: a meta file, a jsonl file, or an HF dataset (directory, file or hub id).

    Relative media paths resolve against each meta entry's `root`; without a meta file, against `image_root`, by
    default the data file's own folder (a dataset folder or hub id: that path itself)."""
    path = Path(path)
    if is_meta_file(path):
        if image_root is not None:
            raise DataSourceError(
                f"{path}: data.image_root applies to a plain jsonl or dataset; a meta file sets 'root' per dataset"
            )
        return read_meta(path)
    root = Path(image_root).expanduser() if image_root is not None else path.parent if path.is_file() else path
    return [DataSource(path.stem if path.suffix else str(path), str(path), root)]


def _read_jsonl(source: DataSource) -> Iterator[Record]:
    path = Path(source.annotation)
    try:
        handle = path.open(encoding="utf-8-sig")  # -sig: a byte-order mark is not an error
    except OSError as error:
        raise DataSourceError(f"{path}: cannot open the annotation file: {error}") from error
    with handle:
        try:
            yield from _parse_lines(handle, source)
        except UnicodeDecodeError as error:
            raise DataSourceError(f"{path}: not UTF-8 text ({error.reason}): is it a jsonl file?") from error


def _parse_lines(handle, source: DataSource) -> Iterator[Record]:
    path = Path(source.annotation)
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        location = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield Record(location, None, source, f"bad JSON: {error.msg} at column {error.colno}")
            continue
        if not isinstance(row, dict):
            yield Record(location, None, source, f"a row must be a JSON object, got {type(row).__name__}")
            continue
        yield Record(location, row, source)


def _read_hf(source: DataSource, streaming: bool) -> Iterator[Record]:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    path = Path(source.annotation)
    try:
        saved_markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if path.is_dir() and any((path / marker).exists() for marker in saved_markers):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset["train"]
        elif path.is_file():
            builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix, "json")
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        else:
            dataset = datasets.load_dataset(str(path), split="train", streaming=streaming)
    except (ValueError, OSError, ConnectionError, DatasetGenerationError) as error:  # hub errors are OSErrors
        raise DataSourceError(f"{path}: cannot load it as a dataset: {error}") from error
    for index, row in enumerate(dataset):
        yield Record(f"{path}[{index}]", dict(row), source)


def iter_records(source: DataSource, streaming: bool = False) -> Iterator[Record]:
    """Every row of a source, in file order (bad rows included, with their error)."""
    path = Path(source.annotation)
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise DataSourceError(
            f"{path}: not a data file ({path.suffix or 'no suffix'}); give an InternVL jsonl, a meta .json, or a "
            f"dataset ({', '.join(DATA_SUFFIXES[1:])}, a saved dataset folder or a hub id)"
        )
    if path.suffix == ".jsonl":
        yield from _read_jsonl(source)
    else:
        yield from _read_hf(source, streaming)


def repeat_records(records: list[Record], repeat_time: float, seed: int) -> list[Record]:
    """InternVL's repeat_time: the whole part repeats the rows, the fraction adds a seeded random subset."""
    whole, fraction = int(math.floor(repeat_time)), repeat_time - math.floor(repeat_time)
    extra = random.Random(seed).sample(records, k=int(len(records) * fraction)) if fraction else []
    return records * whole + extra


def _media_path(value: Any, root: Path) -> Any:
    if isinstance(value, str):
        path = Path(value)
        return str(path if path.is_absolute() else root / path)
    if isinstance(value, dict):  # HF datasets Image feature without decoding: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return _media_path(value["path"], root)
    return value  # a PIL image


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def to_conversation(record: Record) -> Conversation:
    """The record's conversation (roles normalised, media paths resolved). Raises `SampleError` on bad rows."""
    if record.error is not None:
        raise SampleError(record.error)
    row = record.row
    root = record.source.root
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
            raise SampleError('\'conversations\' must be a list of {"from": ..., "value": ...}')
        messages = [{"role": normalise_role(t["from"]), "content": t["value"]} for t in turns]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
        images = _as_list(row.get("image"))
        video = row.get("video")
    elif "messages" in row:
        messages = [_trl_message(m) for m in _as_list(row["messages"])]
        images = _as_list(row.get("images"))
        video = row.get("video")
    else:
        raise SampleError("no 'conversations' (InternVL layout) or 'messages' (TRL layout) field")
    _check_turn_order([message["role"] for message in messages])
    for message in messages:
        if not isinstance(message["content"], str):
            raise SampleError(f"a {message['role']} turn has non-text content: {message['content']!r}")
        if not message["content"].strip():
            raise SampleError(f"empty {message['role']} turn")
    return Conversation(
        messages=messages,
        images=[_media_path(image, root) for image in images],
        video_frames=_video_frames(video, root),
    )


def _check_turn_order(roles: list[str]) -> None:
    """An optional system turn first, then a user turn: a reply with no question before it has no prompt to be
    supervised against (and the chat template cannot render an empty prefix)."""
    if "system" in roles[1:]:
        raise SampleError(f"a system turn must come first; this one is turn {roles.index('system', 1) + 1}")
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if turns and turns[0] != "user":
        raise SampleError(
            f"a conversation must start with a user turn (after an optional system turn); this one starts with "
            f"an {turns[0]} turn"
        )


def _trl_message(message: Any) -> dict[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise SampleError('\'messages\' must be a list of {"role": ..., "content": ...}')
    content = message["content"]
    if isinstance(content, list):  # [{"type": "image"}, {"type": "text", "text": ...}]
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                parts.append("<image>\n")
            elif kind == "video":
                parts.append("<video>\n")
            elif kind == "text":
                parts.append(part.get("text") or "")
            else:
                raise SampleError(f"unknown content part {part!r}; expected type image, video or text")
        content = "".join(parts)
    return {"role": normalise_role(message["role"]), "content": content}


def _video_frames(video: Any, root: Path) -> list:
    """A video as a list of frame images: a directory of frames or a list of frame paths (decoded lazily)."""
    if video is None:
        return []
    if isinstance(video, list):
        return [_media_path(frame, root) for frame in video]
    path = Path(_media_path(video, root))
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp"})
        if not frames:
            raise SampleError(f"video directory {path} holds no frame images")
        return [str(frame) for frame in frames]
    raise SampleError(f"video {path}: give a directory of frames or a list of frame paths (video files unsupported)")
