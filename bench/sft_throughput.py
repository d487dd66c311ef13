"""SFT throughput side by side: our loop vs plain padded Accelerate loops vs TRL's SFTTrainer, one run.

    OMP_NUM_THREADS=1 python bench/sft_throughput.py --model proportional --json bench/results_sft_proportional.json
    OMP_NUM_THREADS=1 python bench/sft_throughput.py --model heavy --json bench/results_sft_throughput.json
    python bench/sft_throughput.py --device cuda --preset internvl3-2b --tile-size 448 --batch-size 4
    python bench/sft_throughput.py --ours loss.reduction=square        # extra overrides for our loops' SFT config

Same model for all (random weights from a config, `bench/proportions.py`: `proportional` has InternVL3-2B's
proportions scaled down, `heavy` the real 151,674-entry vocabulary on a tiny LLM, whose lm_head is 95% of the LLM's
work; `--preset` gives a zoo size), same trainable layout (the official LoRA recipe: ViT frozen, projector full,
LoRA r 16 on the LLM), same gradient checkpointing setting (`--checkpointing`), same data (images with InternVL's tile
mix: 1 / 3 / 5 / 7 tiles with thumbnails; answers of realistic, variable length), same device, same batch size,
AdamW, fp32 on CPU / bf16 on CUDA. Each loop runs `--steps` optimizer steps per round, the loops take turns for
`--rounds` rounds (order rotating), so machine noise hits all of them; the first round is a warm-up and is not
counted. Batches are built before timing, so only forward + backward + optimizer step are timed: wall time and the
main thread's CPU time (`time.thread_time`; with one torch thread all the compute runs there, so on a shared machine
other jobs do not count). Tokens are counted the same way for all: real (non-pad) tokens, the attention mask's sum.

- ours: `ivl.finetune.sft.setup` + `optimizer_step` on the same padded batches (the kit's memory-lean loss: hidden
  states, vocabulary projection only at supervised positions, chunked; right-padded rows attend without the padding
  mask, through sdpa's `is_causal` kernel: `ivl.model.forward.causal_inputs`);
- ours-grouped: the same on the length-grouped batches the padded-grouped loop and TRL train (the kit itself batches
  in arrival order; this row compares the loops' steps on equal batches);
- ours+padding-free: the same with `data.padding_free=true`: each arrival-order batch's samples in one row, each
  attending only to itself (the same samples per step, no padding);
- ours+packing: the same with `data.packing=true`: the round's samples packed (docs/design/packing.md) into sequences of
  at most `--pack-tokens` tokens, `--batch-size` packs per step (so fewer, fuller steps over the same samples);
- padded: HF model forward with `labels` on right-padded batches, the model's own loss, `accelerator.backward`, the
  batches in arrival order;
- padded-grouped: the same loop on length-grouped batches (the round's samples sorted by length, then batched, as
  transformers' `group_by_length` does within its mega-batches);
- trl: TRL's `SFTTrainer` (its default loss: the fused LM head, plus its entropy / accuracy metrics) on the
  length-grouped batches through a data collator, `skip_prepare_dataset`, `gradient_checkpointing` as the others;
  step time from callbacks. TRL refuses `padding_free` and `packing` for vision datasets, so it pads.

Two peak-memory measures per loop (`bench/measure.py`):
- working set (`working_set_gib`): the peak bytes of tensors allocated during the loop's steps and alive together, from
  torch.profiler's memory records on CPU (the CUDA allocator's peak above the start on CUDA), measured after the timed
  rounds on the last round's batches run once more (the profiler slows what it watches): activations, logits,
  gradients, temporaries; not the weights, not allocator caches, not memory outside torch's allocator;
- RSS (`peak_memory_gib`): on CPU, the process RSS peak (sampled every 2 ms) during the timed steps, minus the RSS
  before them (every loop's model stays resident; freed memory is returned to the OS before each block), so allocator
  caching and fragmentation count too; `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ivl.config import load_config
from ivl.data.samples import collate, model_inputs
from ivl.demo.tokenizer import ENGLISH
from ivl.model.presets import load_demo_tokenizer, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package

from measure import Clock, Measure, MemoryPeak, TensorPeak  # noqa: E402
from proportions import MODELS, proportions_report  # noqa: E402

# (image width, height) in tiles -> tiles cut with a thumbnail (max_tiles 6): 1x1 -> 1, 2x1 -> 3, 2x2 -> 5, 3x2 -> 7.
TILE_MIX = {(1, 1): 0.3, (2, 1): 0.3, (2, 2): 0.25, (3, 2): 0.15}
ANSWER_TOKENS_MEDIAN, ANSWER_TOKENS_MAX = 80, 600  # log-normal answer lengths (sigma 0.9), clipped
LOOPS = ("ours", "ours-grouped", "ours+padding-free", "ours+packing", "padded", "padded-grouped", "trl")


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
        config.text_config.update(MODELS[args.model]["text"])
        config.vision_config.update(MODELS[args.model]["vision"])
        if getattr(config.text_config, "layer_types", None):  # one entry per layer, made for the preset's depth
            config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
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
            "loop.num_workers=0", "loop.resume=never",
            f"llm.gradient_checkpointing={str(args.checkpointing).lower()}"]  # fmt: skip


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
        """The round's samples as this loop trains them: packed or padding-free when the config says so, else
        padded."""
        if self.run.config.data.padding_free:
            from ivl.data.packing import collate_padding_free

            pad = self.run.tokenizer.pad_token_id
            return [collate_padding_free([self.run.train_set[i] for i in rows], pad) for rows in indices]
        if not self.run.config.data.packing:
            return self.padded_batches(indices)
        from ivl.data.packed_loader import packed_batches_of

        samples = [self.run.train_set[i] for rows in indices for i in rows]
        pad, batch_size = self.run.tokenizer.pad_token_id, self.run.config.loop.batch_size
        return list(packed_batches_of(samples, self.run.builder, batch_size, pad))

    def train(self, batches: list[dict[str, Any]]) -> float:
        from ivl.finetune.sft import optimizer_step

        with Clock() as clock:
            for batch in batches:
                self.steps += 1
                optimizer_step(self.run, [batch], self.steps)
            synchronize(self.run.accelerator.device)
        self.cpu_seconds = clock.cpu
        return clock.wall


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

    def __init__(self, overrides: list[str], device: str, checkpointing: bool = False):
        from accelerate import Accelerator

        from ivl.model.parts import model_parts
        from ivl.runtime import checkpoint_activations

        model, _, config = trainable_model(overrides, device)
        if checkpointing:  # the LLM's layers, as `llm.gradient_checkpointing` does in ours
            checkpoint_activations(model_parts(model).llm)
        self.accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model.train()

    def train(self, batches: list[dict[str, Any]]) -> float:
        with Clock() as clock:
            for batch in batches:
                inputs = model_inputs(batch, self.accelerator.device, self.dtype)
                with self.accelerator.autocast():
                    loss = self.model(**inputs).loss
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            synchronize(self.accelerator.device)
        self.cpu_seconds = clock.cpu
        return clock.wall


class TRL:
    """TRL's SFTTrainer; each `train` call is one `trainer.train()` over that round's batches (one batch per item,
    in order), timed from step begin to step end by a callback."""

    def __init__(self, overrides: list[str], device: str, out: Path, checkpointing: bool = True):
        self.model, self.tokenizer, self.config = trainable_model(overrides, device)
        self.device, self.out, self.checkpointing = device, out, checkpointing  # TRL's default: checkpointing on
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def train(self, batches: list[dict[str, Any]]) -> float:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer

        class StepClock(TrainerCallback):
            seconds = cpu_seconds = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                synchronize(torch.device(args.device))
                self.start, self.cpu = time.perf_counter(), time.thread_time()

            def on_step_end(self, args, state, control, **kwargs):
                synchronize(torch.device(args.device))
                StepClock.seconds += time.perf_counter() - self.start
                StepClock.cpu_seconds += time.thread_time() - self.cpu

        args = SFTConfig(output_dir=str(self.out), per_device_train_batch_size=1, max_steps=len(batches),
                         learning_rate=self.config.optim.lr, lr_scheduler_type="constant", max_grad_norm=1.0,
                         logging_steps=10**6, save_strategy="no", report_to=[], remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=self.device == "cpu",
                         bf16=self.device == "cuda", dataloader_num_workers=0, max_length=None, seed=0,
                         train_sampling_strategy="sequential", gradient_checkpointing=self.checkpointing,
                         gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
        # The dataset holds batch numbers only (TRL wants a `datasets.Dataset`); the collator hands over that batch.
        numbers = Dataset.from_dict({"batch": list(range(len(batches)))})
        trainer = SFTTrainer(model=self.model, args=args, train_dataset=numbers,
                             data_collator=lambda items: model_inputs(batches[items[0]["batch"]], None, self.dtype),
                             processing_class=self.tokenizer, callbacks=[StepClock()])  # fmt: skip
        trainer.train()
        self.cpu_seconds = StepClock.cpu_seconds
        return StepClock.seconds


def step_indices(num_samples: int, batch_size: int, steps: int, rounds: int, seed: int) -> list[list[list[int]]]:
    """Sample indices of each round's batches: a seeded shuffle, cut into rounds x steps batches."""
    order = list(range(num_samples))
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, rounds * steps * batch_size, batch_size)]
    return [batches[r * steps : (r + 1) * steps] for r in range(rounds)]


def length_grouped(indices: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """The same samples batched by length (longest first), as `group_by_length` batches within a mega-batch."""
    flat = sorted((i for rows in indices for i in rows), key=lambda i: -lengths[i])
    size = len(indices[0])
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def make_loops(args: argparse.Namespace, shared: list[str], work: Path) -> dict[str, Any]:
    packing = [
        "data.packing=true",
        f"data.pack_max_tokens={args.pack_tokens}",
        f"data.pack_max_tiles={args.pack_tiles}",
    ]
    makers = {
        "ours": lambda: Ours([*shared, *args.ours]),
        "ours-grouped": lambda: Ours([*shared, *args.ours]),
        "ours+padding-free": lambda: Ours([*shared, "data.padding_free=true", *args.ours]),
        "ours+packing": lambda: Ours([*shared, *packing, *args.ours]),
        "padded": lambda: Padded(shared, args.device, args.checkpointing),
        "padded-grouped": lambda: Padded(shared, args.device, args.checkpointing),
        "trl": lambda: TRL(shared, args.device, work / "trl", args.checkpointing),
    }
    return {name: makers[name]() for name in args.loops}


def supervised_targets(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model_config = write_model(work / "model", args)
    data = write_data(work / "data", args.rounds * args.steps * args.batch_size, args.tile_size, args.seed)
    shared = sft_overrides(args, work / "model", data, work / "ours")
    loops = make_loops(args, shared, work)
    reference = Ours(shared) if "ours" not in loops else loops["ours"]  # collates every loop's padded batches
    names = tuple(loops)
    results = {name: Measure() for name in names}
    lengths = [int(reference.run.train_set[i]["input_ids"].numel()) for i in range(len(reference.run.train_set))]
    schedule = step_indices(len(reference.run.train_set), args.batch_size, args.steps, args.rounds, args.seed)
    supervised = real = 0
    for round_index, indices in enumerate(schedule):
        padded = reference.padded_batches(indices)  # the same samples, collated once, for the padded loops
        grouped = reference.padded_batches(length_grouped(indices, lengths))
        batches = {"ours": padded, "ours-grouped": grouped, "padded": padded, "padded-grouped": grouped, "trl": grouped}
        for name in ("ours+padding-free", "ours+packing"):
            if name in loops:
                batches[name] = loops[name].batches(indices)
        tokens, samples = sum(map(real_tokens, padded)), sum(len(b["num_tiles"]) for b in padded)
        supervised, real = supervised + sum(map(supervised_targets, padded)), real + tokens
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            assert sum(map(real_tokens, batches[name])) == tokens  # every loop trains exactly these tokens
            with MemoryPeak(args.device) as memory:
                seconds = loops[name].train(batches[name])
            cpu, measure = loops[name].cpu_seconds, results[name]
            measure.peak_memory_gib = max(measure.peak_memory_gib, memory.peak / 2**30)
            print(f"round {round_index} {name:<14} {tokens / cpu:9.1f} tokens/CPU s ({cpu:.2f} s) "
                  f"{tokens / seconds:9.1f} tokens/s wall ({seconds:.2f} s)", flush=True)  # fmt: skip
            if round_index == 0:
                continue  # warm-up: allocator, kernels, first-call overheads
            measure.seconds, measure.cpu_seconds = measure.seconds + seconds, measure.cpu_seconds + cpu
            measure.tokens, measure.samples = measure.tokens + tokens, measure.samples + samples
            measure.steps += len(batches[name])
            measure.per_round_tokens_per_second.append(tokens / seconds)
            measure.per_round_tokens_per_cpu_second.append(tokens / cpu)
    for name in names:  # the last round's batches once more, for the working set (profiled, so not timed)
        with TensorPeak(args.device) as tensors:
            loops[name].train(batches[name])
        results[name].working_set_gib = tensors.peak / 2**30
    rows = {
        name: {"tokens_per_cpu_second": m.tokens / m.cpu_seconds, "tokens_per_second": m.tokens / m.seconds,
               "samples_per_cpu_second": m.samples / m.cpu_seconds, "peak_memory_gib": m.peak_memory_gib,
               "working_set_gib": m.working_set_gib,
               "steps": m.steps, "tokens": m.tokens, "per_round_tokens_per_second": m.per_round_tokens_per_second,
               "per_round_tokens_per_cpu_second": m.per_round_tokens_per_cpu_second}
        for name, m in results.items()
    }  # fmt: skip
    for ours_name in [name for name in ("ours", "ours-grouped", "ours+padding-free", "ours+packing") if name in rows]:
        for name in [name for name in names if not name.startswith("ours")] + ["ours"] * (ours_name != "ours"):
            if name in rows:
                mine, theirs = rows[ours_name], rows[name]
                mine[f"cpu_speedup_vs_{name}"] = mine["tokens_per_cpu_second"] / theirs["tokens_per_cpu_second"]
                mine[f"wall_speedup_vs_{name}"] = mine["tokens_per_second"] / theirs["tokens_per_second"]
                mine[f"memory_ratio_vs_{name}"] = mine["peak_memory_gib"] / max(theirs["peak_memory_gib"], 1e-9)
                mine[f"working_set_ratio_vs_{name}"] = mine["working_set_gib"] / max(theirs["working_set_gib"], 1e-9)
    text, vision = model_config.text_config, model_config.vision_config
    answer = supervised / max(len(lengths), 1)
    return {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": args.preset or args.model,
        "architecture": f"ViT {vision.hidden_size} x {vision.num_hidden_layers}, LLM {text.hidden_size} x "
        f"{text.num_hidden_layers} (MLP {text.intermediate_size}, {text.num_attention_heads} heads / "
        f"{text.num_key_value_heads} KV), vocabulary {text.vocab_size:,}",
        "proportions": None if args.preset else proportions_report(args.model, int(answer) + 20, args.checkpointing),
        "gradient_checkpointing": args.checkpointing,
        "timing": "tokens per main-thread CPU second (time.thread_time) and per wall second; warm-up round left out",
        "memory": "working_set_gib: peak of live tensor bytes allocated during the last round's steps, run once more "
        "(torch.profiler memory records; CUDA: allocator peak above the start); peak_memory_gib: sampled process RSS "
        "above the start during the timed steps (CUDA: max_memory_allocated)",
        "tile_size": args.tile_size,
        "tokens_per_tile": model_config.image_seq_length,
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds_counted": args.rounds - 1,
        "ours_overrides": args.ours,
        "real_tokens_per_sample": real / max(len(lengths), 1),
        "supervised_fraction": supervised / max(real, 1),
        "loops": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}, {result['model']}: {result['architecture']}, {result['tokens_per_tile']} tokens per "
          f"tile, batch {result['batch_size']}, checkpointing {result['gradient_checkpointing']}, supervised "
          f"{result['supervised_fraction']:.2f}")  # fmt: skip
    loops = result["loops"]
    others = [name for name in loops if not name.startswith("ours")]
    header = "".join(f"  {'vs ' + other:>17}" for other in others)
    print(f"{'loop':<15} {'tok/CPU s':>10} {'tok/s wall':>10} {'steps':>6} {'RSS GiB':>8} {'tensors GiB':>11}{header}"
          "   (CPU / wall / tensors)")  # fmt: skip
    for name, row in loops.items():
        ratios = "".join(
            f"  {row[f'cpu_speedup_vs_{o}']:>6.2f}x/{row[f'wall_speedup_vs_{o}']:.2f}x/"
            f"{row[f'working_set_ratio_vs_{o}']:.2f}" if f"cpu_speedup_vs_{o}" in row else f"  {'':>17}" for o in others
        )  # fmt: skip
        print(f"{name:<15} {row['tokens_per_cpu_second']:>10.1f} {row['tokens_per_second']:>10.1f} {row['steps']:>6} "
              f"{row['peak_memory_gib']:>8.2f} {row['working_set_gib']:>11.3f}{ratios}")  # fmt: skip


def profile_step(args: argparse.Namespace, work: Path, out: Path) -> None:
    """One profiled step of ours and of the length-grouped padded loop on the same batch: the top operators by self CPU
    time, written as text next to the JSON."""
    from torch.profiler import ProfilerActivity, profile

    shared = sft_overrides(args, work / "model", work / "data" / "train.jsonl", work / "profile")
    ours, padded = Ours(shared), Padded(shared, args.device, args.checkpointing)
    batches = ours.padded_batches([[0, 1], [2, 3]])
    lines = []
    for name, loop in (("ours", ours), ("padded", padded)):
        loop.train(batches[:1])  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loop.train(batches[1:])
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        lines += [f"== {name}", table]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=tuple(MODELS), default="proportional", help="bench/proportions.py")
    parser.add_argument("--preset", default=None, help="a zoo preset (e.g. internvl3-2b) instead of a bench model")
    parser.add_argument("--tile-size", type=int, default=None, help="default: the bench model's (224); 448 for presets")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per loop per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; the first is a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the LLM in every loop")
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, of {', '.join(LOOPS)}")
    parser.add_argument("--pack-tokens", type=int, default=8192, help="ours+packing: data.pack_max_tokens")
    parser.add_argument("--pack-tiles", type=int, default=48, help="ours+packing: data.pack_max_tiles")
    parser.add_argument("--ours", nargs="*", default=[], help="extra SFT config overrides for our loops")
    parser.add_argument("--profile", type=Path, default=None, help="also profile one step of ours and padded")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.loops = tuple(args.loops.split(","))
    args.tile_size = args.tile_size or (448 if args.preset else MODELS[args.model]["tile_size"])
    with tempfile.TemporaryDirectory(prefix="ivl-sft-bench-") as tmp:
        result = run(args, Path(tmp))
        if args.profile:
            profile_step(args, Path(tmp), args.profile)
    print_table(result)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
