"""Data pipeline throughput: samples/s of tiling + tokenisation on one CPU worker (target: >= 50 samples/s).

    python bench/data_pipeline.py [--samples 200] [--max-tiles 6] [--json out.json]

Uses the shapes task at InternVL's real geometry (448 px tiles, 256 tokens per tile, `preset:tiny`), 448x336 images
(a 3x2 grid + thumbnail = 7 tiles at max_tiles 6), PNG files on disk. Each stage is timed on the same samples:
decode, tiling + normalisation, chat template + tokenisation + image-token expansion, and the whole `SFTDataset`
item (uint8 tiles; normalisation happens on the device), plus JPEG augmentation on top, beside InternVL's own
PIL + fp32 way of tiling the same images. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ivl.data.samples import DataConfig, SampleBuilder, SFTDataset, load_records
from ivl.data.shapes import write_split
from ivl.image import dynamic_tiles, image_to_pixel_values, image_to_tiles, normalize, open_image
from ivl.model.load import ModelConfig, load_model_config, load_tokenizer


def timed(fn, items) -> float:
    """Samples per second of `fn` over `items`, single-threaded."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def pil_reference(image, max_tiles: int) -> torch.Tensor:
    tiles = dynamic_tiles(image, max_tiles=max_tiles)
    return normalize(torch.from_numpy(np.stack([np.asarray(tile) for tile in tiles])).permute(0, 3, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one CPU worker, as a DataLoader worker process runs

    model = ModelConfig(name_or_path="preset:tiny")
    tokenizer, config = load_tokenizer(model), load_model_config(model)
    builder = SampleBuilder(tokenizer, config, DataConfig(max_tiles=args.max_tiles))
    augmenting = SampleBuilder(tokenizer, config, DataConfig(max_tiles=args.max_tiles, jpeg_augment=True))
    with tempfile.TemporaryDirectory() as tmp:
        annotation = write_split(tmp, "train", args.samples, width=448, height=336)
        records = load_records(annotation)
        paths = [str(Path(tmp) / r.row["image"]) for r in records]
        images = [open_image(p) for p in paths]
        conversations = [builder.conversation(r) for r in records]
        num_tiles = image_to_pixel_values(images[0], max_tiles=args.max_tiles).shape[0]
        dataset = SFTDataset(records, builder)
        augmented = SFTDataset(records, augmenting)
        results = {
            "decode_png": timed(open_image, paths),
            # InternVL's own way: PIL resize + crops, then float normalisation on the CPU.
            "reference_pil_tiles_fp32": timed(lambda im: pil_reference(im, args.max_tiles), images),
            "tile_uint8": timed(lambda im: image_to_tiles(im, max_tiles=args.max_tiles), images),
            "tile_and_normalise_fp32_on_cpu": timed(
                lambda im: image_to_pixel_values(im, max_tiles=args.max_tiles), images
            ),
            "template_and_tokenise": timed(lambda c: builder.tokenize(c, [num_tiles]), conversations),
            "full_sample": timed(dataset.__getitem__, list(range(len(dataset)))),
            "full_sample_jpeg_augment": timed(augmented.__getitem__, list(range(len(dataset)))),
        }
        tokens = len(dataset[0]["input_ids"])
    print(f"data pipeline, one CPU worker: {args.samples} shapes samples, 448x336 px -> {num_tiles} tiles of 448 px, "
          f"{tokens} tokens per sample")  # fmt: skip
    print(f"{'stage':<32} {'samples/s':>10}")
    for stage, rate in results.items():
        print(f"{stage:<32} {rate:>10.1f}")
    verdict = "meets" if results["full_sample"] >= 50 else "misses"
    speedup = results["tile_uint8"] / results["reference_pil_tiles_fp32"]
    print(f"full sample: {results['full_sample']:.1f} samples/s ({verdict} the 50 samples/s target); "
          f"tiling {speedup:.1f}x faster than the PIL + fp32 reference")  # fmt: skip
    payload = {"samples": args.samples, "tiles_per_sample": num_tiles, "tokens_per_sample": tokens,
               "samples_per_second": results}  # fmt: skip
    print(json.dumps(payload))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
