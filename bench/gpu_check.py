"""GPU check: a few LoRA / QLoRA steps of random-weight InternVL3-2B and InternVL3.5-8B on one GPU, measured against
the memory planner's prediction and against a plain padded loop and TRL's SFTTrainer in the same run.

    bench/gpu_check.sh                      # on a GPU machine: writes bench/results_gpu_<device>.json (<= 8 minutes)
    DRY=1 bench/gpu_check.sh                # CPU dry mode: tiny presets, 1 step each, JSON in a temporary folder
    python bench/gpu_check.py --dry --out /tmp/x

Cases (preset x method x packing): bf16, flash attention 2 when `flash_attn` imports (else sdpa), QLoRA only when
bitsandbytes imports. Per case:

- ours: `ivl.finetune.sft.setup` + `optimizer_step` (the recipe's own path) on batches collated before timing;
  peak memory from `torch.cuda.max_memory_allocated` / `max_memory_reserved` over all its steps;
- predicted: `ivl.plan.plan_sft` for the same config (its total, in GiB, on the device's memory);
- padded / trl (LoRA, packing off): `bench/sft_throughput.py`'s plain padded Accelerate loop and TRL's SFTTrainer
  (gradient checkpointing as `--checkpointing` sets it for all three) on the same padded batches; skipped where
  trl / datasets do not import.

tokens/s counts real (non-pad) tokens of a second pass over the batches (the first warms up), between CUDA syncs.
Every contender that cannot run is kept in the JSON with the reason. Nothing here is tuned to a device.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package

from sft_throughput import TRL, Ours, Padded, real_tokens, step_indices, write_data  # noqa: E402

GIB = 2**30
# (preset, method, packing). 2B first: a run cut short by the time budget still has the smaller model's figures.
CASES = [
    *[("internvl3-2b", "lora", False), ("internvl3-2b", "lora", True), ("internvl3-2b", "qlora", False)],
    *[("internvl3.5-8b", "lora", False), ("internvl3.5-8b", "lora", True), ("internvl3.5-8b", "qlora", False)],
]
DRY_CASES = [("tiny-112", "lora", False), ("tiny-112", "lora", True), ("tiny-112", "qlora", False)]
# Where each figure of the JSON comes from (printed with every figure too).
SOURCES = {
    "predicted.total_gib": "ivl.plan.plan_sft on the case's config (the device's memory as the card size)",
    "predicted_at_longest_row.total_gib": "ivl.plan.plan_sft with data.max_length (packing: data.pack_max_tokens)"
    " set to the longest row of the case's batches",
    "*.peak_allocated_gib": "torch.cuda.max_memory_allocated over all of the contender's steps (warm-up included)",
    "*.peak_reserved_gib": "torch.cuda.max_memory_reserved over the same steps",
    "*.tokens_per_second": "real (non-pad) tokens / wall seconds of a second pass over the"
    " same batches (the first pass warms up), between CUDA syncs",
    "ours": "ivl.finetune.sft setup + optimizer_step",
    "padded": "bench/sft_throughput.py Padded: HF forward with labels on padded batches, Accelerate, AdamW",
    "loss_kernels": "ivl.losses.linear_cross_entropy (loss.kernel=torch / liger) vs F.cross_entropy on full logits:"
    " relative errors of the loss and of the gradient w.r.t. the hidden states, wall seconds of forward + backward",
    "trl": "bench/sft_throughput.py TRL: SFTTrainer on the same batches, gradient checkpointing as"
    " the run's gradient_checkpointing (as in ours and padded)",
}


def importable(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


def environment(device: str) -> dict[str, Any]:
    """What this machine can run, with versions: the JSON records it next to the numbers."""
    import accelerate
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "flash_attn": importable("flash_attn"),
        "bitsandbytes": importable("bitsandbytes"),
        "trl": importable("trl", "datasets"),
    }


def case_overrides(case: tuple[str, str, bool], args: argparse.Namespace, data: Path, out: Path, env: dict) -> list:
    preset, method, packing = case
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    attention = "flash_attention_2" if env["flash_attn"] and args.device == "cuda" else "sdpa"
    overrides = [f"model.name_or_path=preset:{preset}", f"model.dtype={dtype}",
                 f"model.attn_implementation={attention}", f"data.train={data}", "data.max_tiles=6",
                 f"adapter.qlora={str(method == 'qlora').lower()}", "adapter.dropout=0", "optim.lr=1e-5",
                 "optim.warmup_ratio=0", f"loop.batch_size={args.batch_size}", f"loop.max_steps={10**6}",
                 f"loop.output_dir={out}", "loop.num_workers=0", "loop.resume=never",
                 f"llm.gradient_checkpointing={str(args.checkpointing).lower()}"]  # fmt: skip
    if packing:
        overrides += ["data.packing=true", f"data.pack_max_tokens={args.pack_tokens}", "data.pack_max_tiles=48"]
    return overrides


def loss_kernels(device: str, dry: bool) -> dict[str, Any]:
    """The SFT loss (`ivl.losses.linear_cross_entropy`) against torch's cross-entropy on full logits, and Liger's
    kernel (`loss.kernel=liger`) against both where it runs: loss and gradient w.r.t. the hidden states, at
    InternVL3-2B's width and vocabulary (tiny in dry mode), bf16 on CUDA; max relative differences and wall times."""
    import torch.nn.functional as F

    from ivl.losses import linear_cross_entropy

    rows, width, vocab = (64, 32, 1000) if dry else (4096, 1536, 151_674)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(width, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    hidden, targets = (
        torch.randn(rows, width, device=device, dtype=dtype),
        torch.randint(0, vocab, (rows,), device=device),
    )
    contenders = {"plain": lambda h: F.cross_entropy(lm_head(h).float(), targets, reduction="sum"),
                  "torch": lambda h: linear_cross_entropy(lm_head, h, targets, torch.ones(rows))}  # fmt: skip
    result: dict[str, Any] = {"rows": rows, "hidden": width, "vocab": vocab, "dtype": str(dtype)}
    if device == "cuda" and importable("liger_kernel"):
        contenders["liger"] = lambda h: linear_cross_entropy(lm_head, h, targets, torch.ones(rows), kernel="liger")
    else:
        result["liger"] = {"skipped": "needs CUDA and liger-kernel (carry its wheel)"}
    values = {}
    for name, loss_of in contenders.items():
        for _ in range(2):  # the second call is timed (the first compiles kernels)
            h = hidden.clone().requires_grad_()
            synchronize_device(device)
            start = time.perf_counter()
            loss = loss_of(h)
            loss.backward()
            synchronize_device(device)
        values[name] = (loss.detach().float(), h.grad.float())
        result[name] = {"seconds": time.perf_counter() - start}
    for name in values:
        if name != "plain":
            loss_error = ((values[name][0] - values["plain"][0]).abs() / values["plain"][0].abs()).item()
            grad_error = ((values[name][1] - values["plain"][1]).norm() / values["plain"][1].norm()).item()
            result[name].update(loss_rel_error=loss_error, grad_rel_error=grad_error)
    return result


def synchronize_device(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def skip_reason(case: tuple[str, str, bool], env: dict, started: float, budget_s: float) -> str | None:
    if case[1] == "qlora" and not env["bitsandbytes"]:
        return "bitsandbytes does not import here (carry its wheel: bench/README.md)"
    if time.perf_counter() - started > budget_s:
        return f"time budget of {budget_s:.0f} s spent before this case"
    return None


def timed(train, batches: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """Train `batches` one step each (`train(list) -> seconds`), twice: the first pass is a warm-up (every batch
    shape meets its kernels and allocator blocks once), tokens/s from the second; peak memory over both. The CPU
    dry mode checks the code path only: one pass."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup = device == "cuda"
    if warmup:
        train(batches)
    seconds = train(batches)
    tokens = sum(map(real_tokens, batches))
    row = {"steps": len(batches), "timed_steps": len(batches), "warmup_steps": len(batches) * warmup,
           "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}  # fmt: skip
    if device == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return row


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def predicted(overrides: list[str], device: str, memory_gib: float) -> dict[str, Any]:
    from ivl.config import load_config
    from ivl.finetune.options import SFTConfig
    from ivl.plan import plan_sft

    plan = plan_sft(load_config(SFTConfig, None, overrides), device, memory_gib)  # type: ignore[arg-type]
    return {"total_gib": plan.total_gib, "items_gib": plan.to_json()["items_gib"], "source": "ivl.plan.plan_sft"}


def run_case(case: tuple[str, str, bool], args: argparse.Namespace, work: Path, env: dict) -> dict[str, Any]:
    preset, method, packing = case
    name = f"{preset} {method} packing={'on' if packing else 'off'}"
    tile_size = 112 if preset.startswith("tiny") else 448
    data = write_data(work / f"data-{tile_size}", args.steps * args.batch_size, tile_size, seed=0)
    overrides = case_overrides(case, args, data, work / "out", env)
    memory_gib = env["device_memory_gib"] or 24.0
    result: dict[str, Any] = {"case": name, "overrides": overrides,
                              "predicted": predicted(overrides, args.device, memory_gib)}  # fmt: skip
    ours = Ours(overrides)
    indices = step_indices(len(ours.run.train_set), args.batch_size, args.steps, 1, seed=0)[0]
    padded, batches = ours.padded_batches(indices), ours.batches(indices)
    # The plan is for the worst row a config allows (data.max_length / data.pack_max_tokens); planned again at this
    # data's longest row, it is comparable with the peak measured here.
    longest = max(batch["input_ids"].shape[-1] for batch in batches)
    budget = "data.pack_max_tokens" if packing else "data.max_length"
    result["predicted_at_longest_row"] = {
        **predicted([*overrides, f"{budget}={longest}"], args.device, memory_gib),
        "row_tokens": longest,
    }
    print(f"[{name}] predicted peak {result['predicted']['total_gib']:.2f} GiB at the config's worst row, "
          f"{result['predicted_at_longest_row']['total_gib']:.2f} GiB at this data's longest ({longest} tokens) "
          f"(ivl.plan.plan_sft, {args.device})")  # fmt: skip
    result["ours"] = timed(ours.train, batches, args.device)
    report(name, "ours", result["ours"], "ivl.finetune.sft optimizer_step")
    del ours
    release()
    if method == "lora" and not packing:
        contenders = {"padded": lambda: Padded(overrides, args.device, args.checkpointing),
                      "trl": lambda: TRL(overrides, args.device, work / "trl", args.checkpointing)}  # fmt: skip
        for contender, build in contenders.items():
            if contender == "trl" and not env["trl"]:
                result[contender] = {"skipped": "trl / datasets do not import here (carry their wheels)"}
                continue
            loop = build()
            result[contender] = timed(loop.train, padded, args.device)
            report(name, contender, result[contender], "bench/sft_throughput.py " + type(loop).__name__)
            del loop
            release()
        result["ours"]["speedup_vs_padded"] = ratio(result, "padded")
        result["ours"]["speedup_vs_trl"] = ratio(result, "trl")
    return result


def ratio(result: dict[str, Any], contender: str) -> float | None:
    other = result[contender].get("tokens_per_second")
    return result["ours"]["tokens_per_second"] / other if other else None


def report(case: str, loop: str, row: dict[str, Any], source: str) -> None:
    memory = ""
    if "peak_allocated_gib" in row:
        memory = (f", peak {row['peak_allocated_gib']:.2f} GiB allocated / {row['peak_reserved_gib']:.2f} GiB reserved "
                  "(torch.cuda.max_memory_allocated / max_memory_reserved over all steps)")  # fmt: skip
    print(f"[{case}] {loop}: {row['tokens_per_second']:.1f} tokens/s over {row['timed_steps']} timed steps "
          f"({source}; real tokens / wall seconds between CUDA syncs){memory}", flush=True)  # fmt: skip


def results_path(out: Path, device_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    return out / f"results_gpu_{slug}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", default=os.environ.get("DRY") == "1",
                        help="CPU, tiny presets, 1 step each, JSON in a temporary folder (also DRY=1)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="folder of the JSON (default: bench/)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per contender (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--pack-tokens", type=int, default=8192)
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing of the LLM in every loop (TRL's default is on; ours' is off)",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="cases not started by then are skipped")
    args = parser.parse_args(argv)
    if args.dry:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the dry mode runs on CPU even on a GPU machine
        args.device, args.steps, args.batch_size, args.pack_tokens = "cpu", 1, 1, 2048
        args.out = args.out or Path(tempfile.mkdtemp(prefix="ivl-gpu-check-"))
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry (or DRY=1) for the CPU dry mode")
        args.device = "cuda"
    args.out = args.out or Path(__file__).resolve().parent
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    env = environment(args.device)
    print(json.dumps(env))
    started, cases = time.perf_counter(), DRY_CASES if args.dry else CASES
    summary = {**env, "dry": args.dry, "steps": args.steps, "batch_size": args.batch_size,
               "gradient_checkpointing": args.checkpointing, "seconds": 0.0,
               "sources": SOURCES, "cases": [], "loss_kernels": None}  # fmt: skip
    if args.dry:
        summary["note"] = "dry mode: tiny models on CPU, 1 step each; the figures check the code path, not speed"
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, env["device"] + ("_checkpointing" if args.checkpointing else ""))
    with tempfile.TemporaryDirectory(prefix="ivl-gpu-check-") as tmp:
        for case in cases:
            reason = skip_reason(case, env, started, args.budget_s)
            if reason:
                print(f"[{case}] skipped: {reason}")
                summary["cases"].append({"case": " ".join(map(str, case)), "skipped": reason})
                continue
            try:
                summary["cases"].append(run_case(case, args, Path(tmp), env))
            except Exception as error:  # a lent GPU is scarce: one broken case must not cost the others' figures
                traceback.print_exc()
                summary["cases"].append({"case": " ".join(map(str, case)), "error": f"{type(error).__name__}: {error}"})
                release()
            write_summary(path, summary, started)  # after every case: a run cut off by its time limit keeps its figures
    summary["loss_kernels"] = loss_kernels(args.device, args.dry)
    print(f"[loss kernels] {json.dumps(summary['loss_kernels'])}")
    write_summary(path, summary, started)
    print(f"wrote {path}")
    return path


def write_summary(path: Path, summary: dict[str, Any], started: float) -> None:
    summary["seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(summary, indent=2) + "\n")


def failed_cases(path: Path) -> list[str]:
    return [case["case"] for case in json.loads(path.read_text())["cases"] if "error" in case]


if __name__ == "__main__":
    failed = failed_cases(main())
    if failed:
        print(f"gpu_check: {len(failed)} case(s) failed: {', '.join(failed)} (errors in the JSON)", file=sys.stderr)
        sys.exit(1)
