"""SFT throughput side by side: our loop vs a plain padded Accelerate loop vs TRL's SFTTrainer, one run.

    python bench/sft_throughput.py --tile-size 224 --json bench/results_sft_throughput.json       # CPU, small model
    python bench/sft_throughput.py --device cuda --preset internvl3-2b --tile-size 448 --batch-size 4
    python bench/sft_throughput.py --ours loss.reduction=square        # extra overrides for our loops' SFT config

Same model (random weights from a config: by default ViT 64 x 2 layers, LLM 256 x 2 layers with the real Qwen2.5
vocabulary of 151,674 entries; `--preset` gives a zoo size), same trainable layout (the official LoRA recipe: ViT
frozen, projector full, LoRA r 16 on the LLM), same data (images with InternVL's tile mix: 1 / 3 / 5 / 7 tiles with
thumbnails; answers of realistic, variable length), same device, same batch size, AdamW, fp32 on CPU / bf16 on CUDA.
Each loop runs `--steps` optimizer steps per round, the loops take turns for `--rounds` rounds (order rotating), so
machine noise hits all of them; the first round is a warm-up and is not counted. Batches are built before timing,
so only forward + backward + optimizer step are timed. Tokens are counted the same way for all: real (non-pad)
tokens, i.e. the attention mask's sum.

- ours: `ivl.finetune.sft.setup` + `optimizer_step` on the same padded batches (the kit's memory-lean loss: hidden
  states, vocabulary projection only at supervised positions, chunked);
- ours+packing: the same with `data.packing=true`: the round's samples packed (docs/design/packing.md) into sequences of
  at most `--pack-tokens` tokens, `--batch-size` packs per step (so fewer, fuller steps over the same samples);
- padded: HF model forward with `labels` on right-padded batches, the model's own loss, `accelerator.backward`;
- trl: TRL's `SFTTrainer` (its default loss: the fused LM head, plus its entropy / accuracy metrics) on the same
  padded batches through a data collator, `skip_prepare_dataset`; step time from callbacks.

Peak memory per loop: `torch.cuda.max_memory_allocated` on CUDA; on CPU, the process RSS peak (sampled every 2 ms)
during that loop's steps, minus the RSS before them (all three models stay resident; freed memory is returned to the
OS before each block).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image

from ivl.config import load_config
from ivl.data.samples import collate, model_inputs
from ivl.demo.tokenizer import ENGLISH
from ivl.model.presets import QWEN_VOCAB, load_demo_tokenizer, preset_config

# (image width, height) in tiles -> tiles cut with a thumbnail (max_tiles 6): 1x1 -> 1, 2x1 -> 3, 2x2 -> 5, 3x2 -> 7.
TILE_MIX = {(1, 1): 0.3, (2, 1): 0.3, (2, 2): 0.25, (3, 2): 0.15}
ANSWER_TOKENS_MEDIAN, ANSWER_TOKENS_MAX = 80, 600  # log-normal answer lengths (sigma 0.9), clipped
LOOPS = ("ours", "ours+packing", "padded", "trl")


def write_data(out: Path, num_samples: int, tile_size: int, seed: int) -> Path:
    """Images with the tile mix and questions with log-normal answer lengths, as an InternVL jsonl."""
    rng = random.Random(seed)
    words = ENGLISH.split()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_samples):
        ((cols, rows_),) = rng.choices(list(TILE_MIX), weights=list(TILE_MIX.values()))
        size = (cols * tile_size, rows_ * tile_size)
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (0, 0, size[0] // 2, size[1] // 3))
        image.save(out / "images" / f"{index}.png")
        length = min(ANSWER_TOKENS_MAX, max(4, int(rng.lognormvariate(math.log(ANSWER_TOKENS_MEDIAN), 0.9))))
        answer = " ".join(rng.choice(words) for _ in range(length // 2))  # ~2 demo-tokenizer tokens per word
        conversation = [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                        {"from": "gpt", "value": answer}]  # fmt: skip
        rows.append(json.dumps({"image": f"images/{index}.png", "conversations": conversation}))
    path = out / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def write_model(out: Path, args: argparse.Namespace):
    """A random-weight InternVL with the real vocabulary size, saved with the demo tokenizer (ids < 1,024 are used;
    the embedding and lm_head have all 151,674 rows, as real checkpoints do)."""
    from transformers import InternVLForConditionalGeneration

    tokenizer = load_demo_tokenizer()
    if args.preset:
        config = preset_config(args.preset)
        config.image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    else:
        config = preset_config("tiny", tokenizer)
        llm = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=QWEN_VOCAB)  # fmt: skip
        config.text_config.update(llm)
        config.vision_config.update(dict(hidden_size=64, intermediate_size=256, num_attention_heads=4))
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    config.vision_config.image_size = [args.tile_size, args.tile_size]
    config.image_seq_length = (args.tile_size // 14) ** 2 // 4
    torch.manual_seed(0)
    InternVLForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return config


def sft_overrides(args: argparse.Namespace, model_dir: Path, data: Path, out: Path) -> list[str]:
    """The SFT config all three loops share (ours reads it; the others take model, modes and optimizer from it)."""
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    return [f"model.name_or_path={model_dir}", f"model.dtype={dtype}", f"data.train={data}", "data.max_tiles=6",
            "adapter.dropout=0", "optim.lr=1e-5", "optim.warmup_ratio=0", "optim.max_grad_norm=1.0",
            f"loop.batch_size={args.batch_size}", f"loop.max_steps={10**6}", f"loop.output_dir={out}",
            "loop.num_workers=0", "loop.resume=never"]  # fmt: skip


@dataclass
class Measure:
    seconds: float = 0.0
    tokens: int = 0
    samples: int = 0
    steps: int = 0
    peak_memory_gib: float = 0.0
    per_round_tokens_per_second: list[float] = field(default_factory=list)


class MemoryPeak:
    """Peak memory of a block: CUDA allocator peak, or sampled process RSS above the RSS at the start."""

    def __init__(self, device: str):
        self.device, self.peak, self.stop = device, 0, threading.Event()

    def __enter__(self) -> MemoryPeak:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the baseline is what is live
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self.stop.set()
        self.thread.join()


def real_tokens(batch: dict[str, Any]) -> int:
    return int(batch["attention_mask"].sum())


class Ours:
    """ivl.finetune.sft's setup and optimizer step, on batches from our data path (collated before timing)."""

    def __init__(self, overrides: list[str]):
        from ivl.finetune.sft import SFTConfig, setup

        self.run = setup(load_config(SFTConfig, None, overrides))
        self.run.model.train()
        self.steps = 0  # optimizer steps taken (the update's step number)

    def padded_batches(self, indices: list[list[int]]) -> list[dict[str, Any]]:
        pad = self.run.tokenizer.pad_token_id
        return [collate([self.run.train_set[i] for i in rows], pad) for rows in indices]

    def batches(self, indices: list[list[int]]) -> list[dict[str, Any]]:
        """The round's samples as this loop trains them: packed when the config says so, else padded."""
        if not self.run.config.data.packing:
            return self.padded_batches(indices)
        from ivl.data.packed_loader import packed_batches_of

        samples = [self.run.train_set[i] for rows in indices for i in rows]
        pad, batch_size = self.run.tokenizer.pad_token_id, self.run.config.loop.batch_size
        return list(packed_batches_of(samples, self.run.builder, batch_size, pad))

    def train(self, batches: list[dict[str, Any]]) -> float:
        from ivl.finetune.sft import optimizer_step

        start = time.perf_counter()
        for batch in batches:
            self.steps += 1
            optimizer_step(self.run, [batch], self.steps)
        synchronize(self.run.accelerator.device)
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainable_model(overrides: list[str], device: str = "cpu"):
    """The same model and trainable layout as ours (PEFT LoRA on the LLM, full projector), for the other loops; a
    preset's random weights are drawn on `device`."""
    from ivl.finetune.sft import SFTConfig
    from ivl.model.adapters import apply_trainability
    from ivl.model.load import load_model

    config = load_config(SFTConfig, None, overrides)
    model, tokenizer = load_model(config.model, device if device == "cuda" else None)
    return apply_trainability(model, config.modes(), config.vision, config.adapter), tokenizer, config


class Padded:
    """A plain Accelerate loop: padded batches, the HF model's own loss from `labels`."""

    def __init__(self, overrides: list[str], device: str):
        from accelerate import Accelerator

        model, _, config = trainable_model(overrides, device)
        self.accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model.train()

    def train(self, batches: list[dict[str, Any]]) -> float:
        start = time.perf_counter()
        for batch in batches:
            inputs = model_inputs(batch, self.accelerator.device, self.dtype)
            with self.accelerator.autocast():
                loss = self.model(**inputs).loss
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.accelerator.device)
        return time.perf_counter() - start


class TRL:
    """TRL's SFTTrainer; each `train` call is one `trainer.train()` over that round's batches (one batch per item,
    in order), timed from step begin to step end by a callback."""

    def __init__(self, overrides: list[str], device: str, out: Path):
        self.model, self.tokenizer, self.config = trainable_model(overrides, device)
        self.device, self.out = device, out
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def train(self, batches: list[dict[str, Any]]) -> float:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer

        class StepClock(TrainerCallback):
            seconds = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                synchronize(torch.device(args.device))
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                synchronize(torch.device(args.device))
                StepClock.seconds += time.perf_counter() - self.start

        args = SFTConfig(output_dir=str(self.out), per_device_train_batch_size=1, max_steps=len(batches),
                         learning_rate=self.config.optim.lr, lr_scheduler_type="constant", max_grad_norm=1.0,
                         logging_steps=10**6, save_strategy="no", report_to=[], remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=self.device == "cpu",
                         bf16=self.device == "cuda", dataloader_num_workers=0, max_length=None, seed=0,
                         train_sampling_strategy="sequential")  # fmt: skip
        # The dataset holds batch numbers only (TRL wants a `datasets.Dataset`); the collator hands over that batch.
        numbers = Dataset.from_dict({"batch": list(range(len(batches)))})
        trainer = SFTTrainer(model=self.model, args=args, train_dataset=numbers,
                             data_collator=lambda items: model_inputs(batches[items[0]["batch"]], None, self.dtype),
                             processing_class=self.tokenizer, callbacks=[StepClock()])  # fmt: skip
        trainer.train()
        return StepClock.seconds


def step_indices(num_samples: int, batch_size: int, steps: int, rounds: int, seed: int) -> list[list[list[int]]]:
    """Sample indices of each round's batches: a seeded shuffle, cut into rounds x steps batches."""
    order = list(range(num_samples))
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, rounds * steps * batch_size, batch_size)]
    return [batches[r * steps : (r + 1) * steps] for r in range(rounds)]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model_config = write_model(work / "model", args)
    data = write_data(work / "data", args.rounds * args.steps * args.batch_size, args.tile_size, args.seed)
    shared = sft_overrides(args, work / "model", data, work / "ours")
    ours = Ours([*shared, *args.ours])
    packing = [
        "data.packing=true",
        f"data.pack_max_tokens={args.pack_tokens}",
        f"data.pack_max_tiles={args.pack_tiles}",
    ]
    loops = {"ours": ours, "ours+packing": Ours([*shared, *packing, *args.ours]), "padded": Padded(shared, args.device),
             "trl": TRL(shared, args.device, work / "trl")}  # fmt: skip
    results = {name: Measure() for name in LOOPS}
    schedule = step_indices(len(ours.run.train_set), args.batch_size, args.steps, args.rounds, args.seed)
    for round_index, indices in enumerate(schedule):
        padded = ours.padded_batches(indices)  # the same samples, collated once, for the padded loops
        batches = {name: padded for name in LOOPS} | {"ours+packing": loops["ours+packing"].batches(indices)}
        tokens, samples = sum(map(real_tokens, padded)), sum(len(b["num_tiles"]) for b in padded)
        shift = round_index % len(LOOPS)
        for name in LOOPS[shift:] + LOOPS[:shift]:
            assert sum(map(real_tokens, batches[name])) == tokens  # every loop trains exactly these tokens
            with MemoryPeak(args.device) as memory:
                seconds = loops[name].train(batches[name])
            measure = results[name]
            measure.peak_memory_gib = max(measure.peak_memory_gib, memory.peak / 2**30)
            print(f"round {round_index} {name:<7} {tokens / seconds:10.1f} tokens/s ({seconds:.2f} s)", flush=True)
            if round_index == 0:
                continue  # warm-up: allocator, kernels, first-call overheads
            measure.seconds += seconds
            measure.tokens += tokens
            measure.samples += samples
            measure.steps += len(batches[name])
            measure.per_round_tokens_per_second.append(tokens / seconds)
    rows = {
        name: {"tokens_per_second": m.tokens / m.seconds, "samples_per_second": m.samples / m.seconds,
               "peak_memory_gib": m.peak_memory_gib, "steps": m.steps, "tokens": m.tokens,
               "per_round_tokens_per_second": m.per_round_tokens_per_second}
        for name, m in results.items()
    }  # fmt: skip
    for ours_name in ("ours", "ours+packing"):
        for name in ("padded", "trl"):
            speedup = rows[ours_name]["tokens_per_second"] / rows[name]["tokens_per_second"]
            rows[ours_name][f"speedup_vs_{name}"] = speedup
    text = model_config.text_config
    counted = sum(m.samples for m in results.values())
    return {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": args.preset or f"custom: ViT 64 x 2, LLM {text.hidden_size} x {text.num_hidden_layers}",
        "vocab_size": text.vocab_size,
        "tile_size": args.tile_size,
        "tokens_per_tile": model_config.image_seq_length,
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds_counted": args.rounds - 1,
        "ours_overrides": args.ours,
        "real_tokens_per_sample": sum(m.tokens for m in results.values()) / max(counted, 1),
        "loops": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}, {result['model']}, vocab {result['vocab_size']:,}, "
          f"{result['tokens_per_tile']} tokens per tile, batch {result['batch_size']}")  # fmt: skip
    loops = result["loops"]
    print(
        f"{'loop':<13} {'tokens/s':>10} {'samples/s':>10} {'steps':>6} {'peak GiB':>9}  {'vs padded':>9}  {'vs trl':>7}"
    )
    for name, row in loops.items():
        ratios = [
            f"{row[f'speedup_vs_{other}']:.2f}x" if name.startswith("ours") else "" for other in ("padded", "trl")
        ]
        print(f"{name:<13} {row['tokens_per_second']:>10.1f} {row['samples_per_second']:>10.3f} {row['steps']:>6} "
              f"{row['peak_memory_gib']:>9.2f}  {ratios[0]:>9}  {ratios[1]:>7}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default=None, help="a zoo preset (e.g. internvl3-2b) instead of the small model")
    parser.add_argument("--hidden", type=int, default=256, help="LLM width of the small model")
    parser.add_argument("--tile-size", type=int, default=448, help="448: 256 tokens per tile as real models")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per loop per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; the first is a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pack-tokens", type=int, default=8192, help="ours+packing: data.pack_max_tokens")
    parser.add_argument("--pack-tiles", type=int, default=48, help="ours+packing: data.pack_max_tiles")
    parser.add_argument("--ours", nargs="*", default=[], help="extra SFT config overrides for our loops")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ivl-sft-bench-") as tmp:
        result = run(args, Path(tmp))
    print_table(result)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
