"""Packing efficiency: real tokens / total tokens of the sequences the model runs (target: >= 0.95 at L_max 8192).

    python bench/packing_efficiency.py [--samples 5000] [--max-tokens 8192] [--max-tiles 48] [--json out.json]

The mix (seeded) imitates InternVL SFT data: 80% of the samples hold one image of 1-12 tiles (uniform) x 256 tokens
plus its <img></img> markers, 20% are text only; the text of every sample is drawn from a long-tailed log-normal
(median 150 tokens, sigma 1.2, capped at 12,000), so a few samples exceed L_max on their own and get split between
images. Samples are token-id tensors only (no model, no images decoded): this measures the algorithm, not I/O.

- ours: `ivl.data.packing.Packer` (the training path) at each buffer size; every pack counted at the full
  L_max, as if padded to it (the conservative figure; a batch of one pack has no padding at all).
- padding-only: the same samples in arrival order, batches of `--batch-size` padded to their longest sample, the
  over-long ones truncated to L_max (a padding-only loop cannot run them otherwise).
- padding-only, length-grouped: as a competent user of a padded loop would run it (transformers' `group_by_length`
  idea): the samples sorted by length within windows of 50 batches, then batched and padded the same way.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ivl.data.chat import IGNORE_INDEX
from ivl.data.packing import PackBudget, Packer

TOKENS_PER_TILE = 256
IMG_START, IMG_END, IMG_CONTEXT, TEXT = 1, 2, 3, 10


def sample_mix(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        text = min(12_000, max(8, int(rng.lognormvariate(mu=5.01, sigma=1.2))))  # median e^5.01 = 150
        tiles = [rng.randint(1, 12)] if rng.random() < 0.8 else []
        prompt = min(text, 20)
        ids = [TEXT] * prompt
        for count_tiles in tiles:
            ids += [IMG_START] + [IMG_CONTEXT] * (count_tiles * TOKENS_PER_TILE) + [IMG_END]
        ids += [TEXT] * (text - prompt)
        input_ids = torch.tensor(ids, dtype=torch.int32)
        samples.append(
            {
                "input_ids": input_ids,
                "labels": torch.where(input_ids == TEXT, input_ids, IGNORE_INDEX),
                "tiles": torch.zeros(sum(tiles), 1, 1, 1, dtype=torch.uint8) if tiles else None,
                "num_tiles": tiles,
            }
        )
    return samples


def packed(samples: list[dict], max_tokens: int, max_tiles: int, buffer_size: int) -> dict:
    packer = Packer(PackBudget(max_tokens, max_tiles, buffer_size), IMG_START, IMG_END)
    packs = [pack for position, sample in enumerate(samples) for pack in packer.add(position, sample)]
    packs += packer.flush()
    real = sum(item.num_tokens for pack in packs for item in pack)
    tiles = [sum(item.num_tiles for item in pack) for pack in packs]
    return {
        "method": f"packing, buffer {buffer_size}",
        "sequences": len(packs),
        "efficiency": real / (len(packs) * max_tokens),
        "samples_per_sequence": sum(len(pack) for pack in packs) / len(packs),
        "max_tiles_in_a_sequence": max(tiles),
    }


def length_grouped(samples: list[dict], batch_size: int, window_batches: int = 50) -> list[dict]:
    """Sort by length inside windows of `window_batches` batches (a window, not the whole set, keeps batches random)."""
    window = batch_size * window_batches
    return [s for start in range(0, len(samples), window)
            for s in sorted(samples[start : start + window], key=lambda s: -len(s["input_ids"]))]  # fmt: skip


def padding_only(samples: list[dict], max_tokens: int, batch_size: int, label: str = "") -> dict:
    real = total = 0
    for start in range(0, len(samples), batch_size):
        lengths = [min(len(s["input_ids"]), max_tokens) for s in samples[start : start + batch_size]]
        real += sum(lengths)
        total += max(lengths) * len(lengths)
    return {
        "method": f"padding only{label}, batch {batch_size}",
        "sequences": len(samples),
        "efficiency": real / total,
        "samples_per_sequence": 1.0,
        "max_tiles_in_a_sequence": max(sum(s["num_tiles"]) for s in samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--max-tiles", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(Path(__file__).with_name("results_packing_efficiency.json")))
    args = parser.parse_args()
    samples = sample_mix(args.samples, args.seed)
    lengths = sorted(len(s["input_ids"]) for s in samples)
    median, p90 = lengths[len(lengths) // 2], lengths[int(0.9 * len(lengths))]
    rows = [packed(samples, args.max_tokens, args.max_tiles, size) for size in (20, 64, 256)]
    rows.append(padding_only(samples, args.max_tokens, args.batch_size))
    grouped = length_grouped(samples, args.batch_size)
    rows.append(padding_only(grouped, args.max_tokens, args.batch_size, label=", length-grouped"))
    print(f"{args.samples} samples, tokens median {median}, p90 {p90}, max {lengths[-1]}; "
          f"L_max {args.max_tokens}, T_max {args.max_tiles}")  # fmt: skip
    print(f"{'method':<42}{'sequences':>10}{'real/total':>12}{'samples/seq':>13}{'max tiles':>11}")
    for row in rows:
        print(f"{row['method']:<42}{row['sequences']:>10}{row['efficiency']:>12.3f}"
              f"{row['samples_per_sequence']:>13.2f}{row['max_tiles_in_a_sequence']:>11}")  # fmt: skip
    mix = {"samples": args.samples, "seed": args.seed, "median_tokens": median, "p90_tokens": p90,
           "max_tokens": lengths[-1]}  # fmt: skip
    result = {"max_tokens": args.max_tokens, "max_tiles": args.max_tiles, "mix": mix, "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
