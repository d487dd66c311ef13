"""`ivl data check`: validate every row of a data file before any training, and report.

Each bad row is reported as `file:line: reason` (bad JSON, no assistant turn, placeholder/image mismatch, empty text,
missing / unreadable / oversized image, over max_length after image expansion, ...). Repetition flags
(docs/design/data_filtering.md) are counted but do not make a row bad. Preference rows (chosen / rejected) are checked
as both of their sides. Tile and token-length histograms show what training will see.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ivl.data.chat import SampleError, thinks
from ivl.data.filters import repetition_flags
from ivl.data.preference import is_preference_row, measure_pair
from ivl.data.records import DataSourceError, iter_records, sources_for
from ivl.data.samples import SampleBuilder
from ivl.image import ImageError

MAX_LISTED = 50  # bad rows printed in full; the JSON report has them all


@dataclass
class CheckReport:
    path: str
    rows_ok: int = 0
    bad_rows: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    flagged_rows: list[tuple[str, list[str]]] = field(default_factory=list)
    tiles: Counter = field(default_factory=Counter)  # tiles per sample -> rows
    token_lengths: list[int] = field(default_factory=list)
    thinking_rows: int = 0  # rows whose answers reason in <think>...</think> (InternVL3.5 thinking mode)

    @property
    def clean(self) -> bool:
        return not self.bad_rows

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows_ok": self.rows_ok,
            "rows_bad": len(self.bad_rows),
            "rows_thinking": self.thinking_rows,
            "bad_rows": [{"location": loc, "reason": reason} for loc, reason in self.bad_rows],
            "flagged_rows": [{"location": loc, "flags": flags} for loc, flags in self.flagged_rows],
            "tiles_histogram": {str(k): v for k, v in sorted(self.tiles.items())},
            "token_length_histogram": dict(_length_buckets(self.token_lengths)),
            "max_tokens": max(self.token_lengths, default=0),
        }

    def format(self) -> str:
        lines = [f"{self.path}: {self.rows_ok} rows OK, {len(self.bad_rows)} bad, {len(self.flagged_rows)} flagged"]
        if self.thinking_rows:
            lines.append(f"  {self.thinking_rows} of the OK rows think (<think>...</think> before the answer)")
        for location, reason in self.bad_rows[:MAX_LISTED]:
            lines.append(f"  {location}: {reason}")
        if len(self.bad_rows) > MAX_LISTED:
            lines.append(f"  ... and {len(self.bad_rows) - MAX_LISTED} more bad rows (--json lists all)")
        for location, flags in self.flagged_rows[:MAX_LISTED]:
            lines.append(f"  {location}: flagged: {'; '.join(flags)}")
        if self.tiles:
            lines += ["", "tiles per sample:", *_bars([(str(k), v) for k, v in sorted(self.tiles.items())])]
        if self.token_lengths:
            lines += ["", "tokens per sample (after image expansion):", *_bars(_length_buckets(self.token_lengths))]
        return "\n".join(lines)


def _length_buckets(lengths: list[int]) -> list[tuple[str, int]]:
    """Power-of-two buckets: '<=64', '<=128', ..."""
    counts = Counter(2 ** max(6, math.ceil(math.log2(max(length, 1)))) for length in lengths)
    return [(f"<={edge}", counts[edge]) for edge in sorted(counts)]


def _bars(rows: list[tuple[str, int]], width: int = 40) -> list[str]:
    peak = max(count for _, count in rows)
    return [f"  {label:>8} | {'#' * max(1, round(width * count / peak)):<{width}} {count}" for label, count in rows]


def check_data(path: str | Path, builder: SampleBuilder, progress: bool = True) -> CheckReport:
    """Check every row of `path` (jsonl, meta file or HF dataset) with the pipeline training will use."""
    report = CheckReport(str(path))
    try:
        sources = sources_for(path, builder.data.image_root)
    except DataSourceError as error:
        report.bad_rows.append((str(path), str(error)))
        return report
    for source in sources:
        try:
            records = iter_records(source, streaming=builder.data.streaming)
            for record in tqdm(records, desc=f"checking {source.name}", unit=" rows", disable=not progress):
                _check_record(record, builder, report)
        except DataSourceError as error:  # its message starts with the file already
            report.bad_rows.append((source.annotation, str(error).removeprefix(f"{source.annotation}: ")))
    return report


def _check_record(record, builder: SampleBuilder, report: CheckReport) -> None:
    try:  # a preference row (chosen / rejected) is checked as both of its sides
        measured = measure_pair(builder, record) if is_preference_row(record.row) else builder.measure(record)
    except (SampleError, ImageError) as error:
        report.bad_rows.append((record.location, str(error)))
        return
    report.rows_ok += 1
    report.tiles[measured["num_tiles"]] += 1
    report.token_lengths.append(measured["num_tokens"])
    report.thinking_rows += thinks(measured["conversation"].messages)
    replies = [m["content"] for m in measured["conversation"].messages if m["role"] == "assistant"]
    flags = [flag for reply in replies for flag in repetition_flags(reply)]
    if flags:
        report.flagged_rows.append((record.location, flags))
