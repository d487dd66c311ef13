"""`ivl demo`: the built-in default job on the synthetic shapes task.

Until the SFT recipe lands this runs the data pipeline end to end: write the task, check it, build a tiny InternVL,
turn every sample into tiles and tokens, batch them and run the model's forward pass, reporting throughput and the
untrained model's validation loss.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from finetune.data.checks import check_data
from finetune.data.samples import DataConfig, SampleBuilder, SFTDataset, collate, load_records, model_inputs
from ivl.demo.shapes import write_dataset
from ivl.model.load import ModelConfig, load_model, tokens_per_tile

DEMO_MODEL = "preset:tiny-112"


def run_demo(out_dir: str | Path = "outputs/demo", num_train: int = 256, num_validation: int = 64) -> dict:
    out_dir = Path(out_dir)
    started = time.perf_counter()
    print(f"[1/4] writing the shapes task ({num_train} train / {num_validation} validation) to {out_dir / 'data'}")
    write_dataset(out_dir / "data", num_train, num_validation, width=448, height=336)

    model, tokenizer = load_model(ModelConfig(name_or_path=DEMO_MODEL, dtype="float32"))
    data = DataConfig(max_tiles=6, max_length=1024)
    builder = SampleBuilder(tokenizer, model.config, data)
    geometry = f"{builder.tile_size} px tiles, {builder.tokens_per_tile} tokens each"
    print(f"[2/4] checking the data ({DEMO_MODEL}: {geometry})")
    for split in ("train", "validation"):
        report = check_data(out_dir / "data" / f"{split}.jsonl", builder, progress=False)
        print("      " + report.format().splitlines()[0])
        if not report.clean:
            raise RuntimeError(report.format())

    print("[3/4] tiling + tokenizing + batching the train split")
    train = SFTDataset(load_records(out_dir / "data" / "train.jsonl"), builder)
    collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(train, batch_size=8, collate_fn=collate_fn)
    tick = time.perf_counter()
    num_tiles = num_tokens = 0
    for batch in loader:
        num_tiles += batch["tiles"].shape[0]
        num_tokens += int(batch["attention_mask"].sum())
    pipeline_seconds = time.perf_counter() - tick
    print(
        f"      {len(train)} samples, {num_tiles} tiles, {num_tokens} tokens in {pipeline_seconds:.1f}s "
        f"({len(train) / pipeline_seconds:.0f} samples/s on one worker)"
    )

    print("[4/4] forward pass of the untrained tiny model on the validation split")
    validation = SFTDataset(load_records(out_dir / "data" / "validation.jsonl"), builder)
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for batch in DataLoader(validation, batch_size=8, collate_fn=collate_fn):
            inputs = model_inputs(batch)
            supervised = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += model(**inputs).loss.item() * supervised
            tokens += supervised
    loss = loss_sum / tokens
    print(
        f"      validation loss {loss:.3f} over {int(tokens)} answer tokens (uniform guess: "
        f"{math.log(model.config.text_config.vocab_size):.3f}); image tokens per tile: {tokens_per_tile(model.config)}"
    )
    print(f"done in {time.perf_counter() - started:.1f}s. Next:")
    print(f"  ivl data check {out_dir / 'data' / 'train.jsonl'}            # the report for one file")
    print("  ivl data check YOUR.jsonl model.name_or_path=OpenGVLab/InternVL3-1B-hf   # your data, real token counts")
    return {"validation_loss": loss, "samples_per_second": len(train) / pipeline_seconds}
