"""Rule filters for noisy text (docs/design/data_filtering.md): the LLM is far more sensitive to bad data than the ViT.

Each rule looks at one text and returns a short flag when it fires; `ivl data check` counts them and
`data.drop_repetitive` drops flagged samples. Repetitive n-grams are the main cause of looping outputs.
"""

from __future__ import annotations

import re
from collections import Counter

MAX_CHARS = 32_000  # one reply longer than this is abnormal for SFT data
CHAR_RUN = re.compile(r"(.)\1{31,}", re.DOTALL)  # one character 32+ times in a row ("0000...", "!!!!...")
MIN_LINES, MAX_REPEATED_LINE_FRACTION = 4, 0.3
NGRAM, MIN_WORDS, MAX_NGRAM_FRACTION = 3, 30, 0.3


def repetition_flags(text: str) -> list[str]:
    """Which rules `text` breaks (empty when clean)."""
    flags = []
    if len(text) > MAX_CHARS:
        flags.append(f"abnormal length ({len(text)} characters)")
    run = CHAR_RUN.search(text)
    if run:
        flags.append(f"run of {len(run.group(0))} x {run.group(1)!r}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= MIN_LINES:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > MAX_REPEATED_LINE_FRACTION:
            flags.append(f"repeated lines ({repeated} of {len(lines)})")
    words = text.split()
    if len(words) >= MIN_WORDS:
        ngrams = Counter(tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1))
        gram, count = ngrams.most_common(1)[0]
        if count * NGRAM / len(words) > MAX_NGRAM_FRACTION:
            flags.append(f"repetitive {NGRAM}-gram {' '.join(gram)!r} x {count}")
    return flags
