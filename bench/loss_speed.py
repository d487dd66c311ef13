"""CPU time per supervised row of the SFT loss: plain cross-entropy on full logits vs the kit's losses, same rows.

    python bench/loss_speed.py --rows 128,512 --repeats 3 --json bench/results_loss_speed.json

At InternVL3-2B's LLM width (1536) and vocabulary (151,674 entries), fp32, one torch thread, the loss of `--rows`
supervised positions (hidden states [N, H] that require a gradient, lm_head frozen as under LoRA; `--train-lm-head`
trains it too), forward + backward:
- `plain`: `F.cross_entropy(lm_head(hidden), targets, reduction="sum")`, the [N, V] logits built whole;
- `recompute`: the kit's `token_logps` (chunks of logits under activation checkpointing: the backward pass projects
  each chunk again), as MPO and RL use it;
- `kit`: the kit's SFT loss, `linear_cross_entropy` (the gradient computed in the forward chunk, kept instead of the
  logits; backward only scales it).
The contenders take turns in each repeat (order rotating); the first repeat is a warm-up. Time is the main thread's
CPU time (`time.thread_time`: with one torch thread all the work runs there, so other jobs on a shared machine do not
count) and wall time. Peak memory: a separate pass per contender and size, the process RSS sampled every 2 ms above
the RSS before the call (freed memory handed back to the OS first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import MemoryPeak
from torch import nn

from ivl import losses

HIDDEN, VOCAB = 1536, 151_674  # InternVL3-2B's LLM (Qwen2.5-1.5B)
CONTENDERS = ("plain", "recompute", "kit")


def loss_of(name: str, lm_head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if name == "plain":
        return F.cross_entropy(lm_head(hidden), targets, reduction="sum")
    if name == "recompute":
        return -losses.token_logps(lm_head, hidden, targets).sum()
    return losses.linear_cross_entropy(lm_head, hidden, targets, torch.ones(targets.shape[0]))


def one_call(name: str, lm_head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one forward + backward."""
    hidden.grad = None
    lm_head.zero_grad(set_to_none=True)
    cpu, wall = time.thread_time(), time.perf_counter()
    loss_of(name, lm_head, hidden, targets).backward()
    return time.thread_time() - cpu, time.perf_counter() - wall


def measure(rows_list: list[int], repeats: int, train_lm_head: bool) -> dict:
    torch.manual_seed(0)
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(train_lm_head)
    nn.init.normal_(lm_head.weight, std=0.02)
    results = {}
    for rows in rows_list:
        hidden = (torch.randn(rows, HIDDEN) * 2).requires_grad_()
        targets = torch.randint(0, VOCAB, (rows,))
        times = {name: {"cpu": [], "wall": []} for name in CONTENDERS}
        for repeat in range(repeats + 1):
            shift = repeat % len(CONTENDERS)
            for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                cpu, wall = one_call(name, lm_head, hidden, targets)
                if repeat:  # the first repeat warms up the allocator and the kernels
                    times[name]["cpu"].append(cpu)
                    times[name]["wall"].append(wall)
        peaks = {}
        for name in CONTENDERS:
            with MemoryPeak("cpu") as memory:
                one_call(name, lm_head, hidden, targets)
            peaks[name] = memory.peak / 2**30
        row = {"rows": rows, "chunk_rows_kit": losses.loss_chunk_rows(VOCAB, torch.float32, torch.device("cpu"))}
        for name in CONTENDERS:
            cpu = min(times[name]["cpu"])
            row[name] = {"cpu_ms_per_row": 1e3 * cpu / rows, "wall_ms_per_row": 1e3 * min(times[name]["wall"]) / rows,
                         "cpu_s_all": times[name]["cpu"], "wall_s_all": times[name]["wall"],
                         "peak_gib": peaks[name]}  # fmt: skip
        for name in ("recompute", "kit"):
            row[f"{name}_vs_plain_cpu"] = row[name]["cpu_ms_per_row"] / row["plain"]["cpu_ms_per_row"]
        results[str(rows)] = row
        print_row(row)
    return results


def print_row(row: dict) -> None:
    for name in CONTENDERS:
        ratio = row.get(f"{name}_vs_plain_cpu", 1.0)
        print(f"rows {row['rows']:>5} {name:<10} {row[name]['cpu_ms_per_row']:7.2f} ms/row CPU "
              f"{row[name]['wall_ms_per_row']:7.2f} ms/row wall  {ratio:5.2f}x plain  "
              f"peak {row[name]['peak_gib']:.2f} GiB", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="128,512", help="comma-separated supervised row counts")
    parser.add_argument("--repeats", type=int, default=3, help="counted repeats (one warm-up repeat is added)")
    parser.add_argument("--train-lm-head", action="store_true", help="lm_head's weight trains too (full LLM)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [int(value) for value in args.rows.split(",")]
    result = {"torch": torch.__version__, "threads": 1, "hidden": HIDDEN, "vocab": VOCAB, "dtype": "float32",
              "train_lm_head": args.train_lm_head, "timing": "min over repeats of time.thread_time per call",
              "sizes": measure(rows, args.repeats, args.train_lm_head)}  # fmt: skip
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
