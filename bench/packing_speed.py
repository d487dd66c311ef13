"""Packing vs not packing at equal tokens, CPU: does a packed row cost no more than its samples run one by one?

    python bench/packing_speed.py [--rounds 3] [--samples 12] [--max-tokens 2048] [--threads 1] [--json OUT.json]

The same seeded samples (text only, log-normal lengths 64-1,536 tokens, the second half of each supervised) go
through one training forward + backward of a random-weight LLM, per contender, in interleaved rounds (the order
rotates each round); each contender's figure is its median over the rounds, in CPU time (`time.process_time`, all
threads of the process) and wall time. One torch thread by default: on a shared machine, idle OpenMP threads spin in
their barriers and that spinning counts as CPU time, more for many small calls than for few large ones.

- unpacked: one sample per micro-batch (batch 1, as the shipped configs run: no padding), plain `sdpa`;
- packed, per sub-sample: the samples packed by `ivl.data.packing.Packer` into rows of <= --max-tokens tokens, one
  row per micro-batch, the LLM on `ivl_packed_sdpa` (what `ivl sft` runs with packing);
- packed, dense mask: the same rows on plain `sdpa`, where transformers builds a block-diagonal [T, T] mask from the
  restarting position ids (the kit's path before per-sub-sample attention).

The model keeps InternVL3-2B's LLM proportions at a quarter of its width (Qwen2.5-1.5B: width 1,536, MLP 8,960,
head dim 128, 6 query heads per KV head -> width 384, MLP 2,240, 3 heads of 128, 1 KV head), 4 layers, the demo
tokenizer's small vocabulary; every weight trains (full fine-tuning). Rows of 2,048 tokens at width 384 keep the
real model's ratio of attention to linear work at 8,192 tokens (sequence / width ~5).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration

from ivl.data.chat import IGNORE_INDEX
from ivl.data.packing import PackBudget, Packer, collate_packs
from ivl.data.samples import collate
from ivl.evaluate import batch_logps
from ivl.model.packed_attention import use_packed_attention
from ivl.model.presets import TINY_VISION, _make_config, load_demo_tokenizer

LLM = dict(model_type="qwen2", hidden_size=384, intermediate_size=2240, num_attention_heads=3, num_key_value_heads=1,
           head_dim=128, num_hidden_layers=4, tie_word_embeddings=False)  # fmt: skip


def make_samples(count: int, seed: int, vocab: int) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        length = min(1536, max(64, int(rng.lognormvariate(mu=6.0, sigma=0.6))))  # median e^6 = 403 tokens
        ids = torch.tensor([rng.randrange(10, vocab) for _ in range(length)])
        labels = ids.clone()
        labels[: length // 2] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels, "tiles": None, "num_tiles": []})
    return samples


def make_model(tokenizer) -> InternVLForConditionalGeneration:
    text = {**LLM, "vocab_size": -(-len(tokenizer) // 64) * 64, "pad_token_id": tokenizer.pad_token_id}
    config = _make_config(TINY_VISION, text, image_token_id=tokenizer.pad_token_id, image_size=112)
    torch.manual_seed(0)
    return InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa").train()


def step(model, batches: list[dict]) -> float:
    """Forward + backward over `batches` (the kit's loss path: supervised positions only); returns the loss sum."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        _, logps = batch_logps(model, batch, torch.device("cpu"), torch.float32)
        loss = -logps.sum()
        loss.backward()
        total += loss.item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is work, not spinning)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_demo_tokenizer()
    model = make_model(tokenizer)
    samples = make_samples(args.samples, 0, model.config.text_config.vocab_size)
    packer = Packer(PackBudget(args.max_tokens, 48, 16), -1, -2)
    packs = [pack for i, sample in enumerate(samples) for pack in packer.add(i, sample)] + packer.flush()
    pad = tokenizer.pad_token_id
    contenders = {
        "unpacked": ("sdpa", [collate([sample], pad) for sample in samples]),
        "packed_per_sub_sample": ("packed", [collate_packs([pack], pad) for pack in packs]),
        "packed_dense_mask": ("sdpa", [collate_packs([pack], pad) for pack in packs]),
    }
    names = list(contenders)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    losses = {}
    for index in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is not counted
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            attention, batches = contenders[name]
            if attention == "packed":
                use_packed_attention(model, "sdpa")
            else:
                model.set_attn_implementation({"text_config": "sdpa"})
            cpu, wall = time.process_time(), time.perf_counter()
            losses[name] = step(model, batches)
            if index > 0:
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
            print(f"round {index} {name}: {time.process_time() - cpu:.1f} s CPU", file=sys.stderr, flush=True)
    median = {name: {"cpu_s": statistics.median(c for c, _ in t), "wall_s": statistics.median(w for _, w in t)}
              for name, t in times.items()}  # fmt: skip
    base = median["unpacked"]
    result = {
        "model": {**LLM, "vocab_size": model.config.text_config.vocab_size, "trains": "every weight"},
        "tokens": sum(len(s["input_ids"]) for s in samples),
        "samples": len(samples),
        "sample_lengths": [len(s["input_ids"]) for s in samples],
        "rows": [sum(item.num_tokens for item in pack) for pack in packs],
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "losses_equal": max(losses.values()) - min(losses.values()) <= 1e-4 * abs(losses["unpacked"]),
        "median": median,
        "per_round": times,
        "time_vs_unpacked": {name: {key: value / base[key] for key, value in m.items()} for name, m in median.items()},
    }
    print(json.dumps({key: result[key] for key in ("tokens", "rows", "losses_equal", "time_vs_unpacked")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
