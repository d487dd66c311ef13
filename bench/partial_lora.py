"""Partial LoRA against ordinary LoRA on the shapes task, same budget: image accuracy and the LLM's text-only drift.

    python bench/partial_lora.py [--steps 600] [--r 16] [--model ivl/assets/demo_base] [--json out.json]

Both runs use the official LoRA recipe's parts (ViT frozen, projector trained fully, LoRA on the LLM) with the same
data, seed, steps, batch, learning rate and rank; only `adapter.kind` differs. Measured on the validation split:
loss and greedy exact-match with the images, and the text-only loss of the LLM: the same validation questions with
the image removed (`<image>` and the image file dropped), before training and after each run. Partial LoRA should
leave the text-only loss exactly where the base had it; ordinary LoRA's drift is printed beside it.
Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from ivl.config import load_config
from ivl.data.samples import DataConfig, SampleBuilder, SFTDataset, load_records
from ivl.data.shapes import write_dataset
from ivl.demo.pretrain import IMAGE_SIZE, demo_base_path
from ivl.evaluate import evaluate_loss
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.model.adapters import load_trained
from ivl.model.load import ModelConfig, load_model
from ivl.model.parts import unwrap

# As the demo: 224 px images as 2x2 tiles of 112 px, no thumbnail.
DATA = {"max_tiles": 4, "use_thumbnail": False, "max_length": 256}


def write_text_only(validation: Path, out: Path) -> Path:
    """The validation rows with their image removed: the same questions and answers, text only."""
    rows = []
    for line in validation.read_text().splitlines():
        row = json.loads(line)
        row.pop("image")
        for turn in row["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
        rows.append(json.dumps(row))
    out.write_text("\n".join(rows) + "\n")
    return out


def text_only_loss(model, tokenizer, path: Path) -> float:
    builder = SampleBuilder(tokenizer, unwrap(model).config, DataConfig(validation=str(path), **DATA))
    dataset = SFTDataset(load_records(path), builder)
    return evaluate_loss(model, dataset, Accelerator(), 64, tokenizer.pad_token_id, torch.float32)["loss"]


def train(kind: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    overrides = [
        f"model.name_or_path={args.model}",
        "model.dtype=float32",
        f"data.train={data / 'train.jsonl'}",
        f"data.validation={data / 'validation.jsonl'}",
        *(f"data.{key}={value}" for key, value in DATA.items()),
        f"adapter.kind={kind}",
        f"adapter.r={args.r}",
        f"adapter.alpha={2 * args.r}",
        "adapter.dropout=0",
        f"optim.lr={args.lr}",
        f"loop.max_steps={args.steps}",
        f"loop.batch_size={args.batch_size}",
        f"loop.log_every={args.steps}",
        f"eval.exact_match_samples={args.validation}",
        "eval.max_new_tokens=8",
        "eval.batch_size=64",
        "loop.num_workers=1",
        "loop.resume=never",
        f"loop.output_dir={out}",
    ]
    started = time.perf_counter()
    result = run_sft(load_config(SFTConfig, None, overrides))
    seconds = time.perf_counter() - started
    model, tokenizer, _ = load_trained(result.output)
    return {
        "adapter": kind,
        "exact_match": result.metrics["eval_exact_match"],
        "eval_loss": result.metrics["eval_loss"],
        "text_only_loss": text_only_loss(model, tokenizer, data / "validation_text.jsonl"),
        "train_loss": result.metrics["loss"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(demo_base_path()), help="the base (default: the demo's pre-trained one)")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=128)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-partial-lora-") as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, args.train, args.validation, width=IMAGE_SIZE, height=IMAGE_SIZE)
        write_text_only(data / "validation.jsonl", data / "validation_text.jsonl")
        base, tokenizer = load_model(ModelConfig(name_or_path=args.model, dtype="float32"))
        base_text_loss = text_only_loss(base, tokenizer, data / "validation_text.jsonl")
        runs = [train(kind, data, Path(tmp) / kind, args) for kind in ("lora", "partial_lora")]

    print(f"{args.model}, {args.steps} steps x {args.batch_size}, lr {args.lr}, r {args.r}, ViT frozen, projector full")
    print(f"base text-only validation loss: {base_text_loss:.6f}")
    print(f"{'adapter':<13} {'exact match':>11} {'eval loss':>10} {'text-only loss':>15} {'drift':>10} {'s':>6}")
    for run in runs:
        run["text_only_drift"] = run["text_only_loss"] - base_text_loss
        print(f"{run['adapter']:<13} {run['exact_match']:>11.3f} {run['eval_loss']:>10.4f} "
              f"{run['text_only_loss']:>15.6f} {run['text_only_drift']:>+10.6f} {run['seconds']:>6.0f}")  # fmt: skip
    report = {"settings": vars(args), "base_text_only_loss": base_text_loss, "runs": runs}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
