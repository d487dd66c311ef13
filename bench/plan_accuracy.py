"""`ivl plan --device cpu` against the measured peak RSS of real training steps of the kit's SFT loop.

    python bench/plan_accuracy.py [--cases lora_8k,...] [--steps 2] [--json bench/results_plan_accuracy.json]

Each case writes a small InternVL checkpoint (Qwen2-style LLM with InternVL3's 151,674-entry vocabulary, a small ViT)
and a jsonl whose every sample fills `data.max_length` exactly (no padding) with `data.max_tiles` tiles, then runs
`ivl.finetune.sft.setup` + `train` for `--steps` optimizer steps in a fresh process. Measured: the process's peak RSS
during training (VmHWM, reset with /proc/self/clear_refs right after setup, so the loading transients of from_pretrained
are left out; the model, the interpreter and every import stay in it) and, for reference, ru_maxrss of the whole
process. The plan predicts the whole process's peak (its "process baseline" item included): nothing is subtracted.
The recipe's loss is the memory-lean one (one chunk of logits at a time, supervised positions only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
VOCAB_SIZE = 151_674

# name -> (model shape, config overrides). ViT: 224 px tiles (64 LLM tokens each), width `vision`.
CASES = {
    "lora_8k": (dict(hidden=256, inter=1024, layers=2, vision=32),
                ["data.max_length=8192", "data.max_tiles=1"]),
    "lora_8k_ckpt": (dict(hidden=256, inter=1024, layers=2, vision=32),
                     ["data.max_length=8192", "data.max_tiles=1", "llm.gradient_checkpointing=true"]),
    "qlora_4k": (dict(hidden=512, inter=1536, layers=4, vision=32),
                 ["data.max_length=4096", "data.max_tiles=1", "adapter.qlora=true", "optim.optimizer=adamw_8bit"]),
    "full_2k_batch2": (dict(hidden=256, inter=1024, layers=2, vision=32),
                       ["data.max_length=2048", "data.max_tiles=1", "stage=stage2", "loop.batch_size=2"]),
    "vit_lora_7tiles_4k": (dict(hidden=384, inter=1024, layers=3, vision=128),
                           ["data.max_length=4096", "data.max_tiles=6", "stage=none", "vision.mode=lora",
                            "projector.mode=full", "llm.mode=lora"]),
    "lora_1k_batch4": (dict(hidden=1024, inter=2816, layers=2, vision=32),
                       ["data.max_length=1024", "data.max_tiles=1", "loop.batch_size=4"]),
}  # fmt: skip

CHILD = """
import json, resource, sys
import ivl.finetune.sft as sft
from ivl.config import load_config
config = load_config(sft.SFTConfig, sys.argv[1], [])
run = sft.setup(config)
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
after_setup = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here: training only
sft.train(run)
print("RESULT", json.dumps({"after_setup": after_setup, "train_peak": status("VmHWM"),
                            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_model(out_dir: Path, hidden: int, inter: int, layers: int, vision: int) -> None:
    import torch
    from transformers import InternVLForConditionalGeneration

    from ivl.model.load import save_checkpoint
    from ivl.model.presets import load_demo_tokenizer, preset_config, tokens_per_tile_of

    tokenizer = load_demo_tokenizer()
    config = preset_config("tiny-112", tokenizer)
    text, vit = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, inter, layers
    text.layer_types = ["full_attention"] * layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = hidden // 64, 2, 64
    text.vocab_size = VOCAB_SIZE
    vit.hidden_size, vit.intermediate_size, vit.num_attention_heads = vision, 4 * vision, max(2, vision // 32)
    vit.image_size = [224, 224]
    config.image_seq_length = tokens_per_tile_of(224, 14, 0.5)
    torch.manual_seed(0)
    save_checkpoint(InternVLForConditionalGeneration(config), tokenizer, out_dir)


def write_data(out_dir: Path, tokens: int, max_tiles: int, rows: int) -> Path:
    """`rows` samples of exactly `tokens` tokens after image expansion (one image of `max_tiles` 224 px tiles,
    + the thumbnail when there are several); every answer token is supervised."""
    from PIL import Image

    from ivl.config import ConfigError
    from ivl.data.samples import DataConfig, SampleBuilder
    from ivl.model.load import ModelConfig, load_model_config
    from ivl.model.presets import load_demo_tokenizer

    columns, rows_of_tiles = {1: (1, 1), 2: (2, 1), 4: (2, 2), 6: (3, 2)}[max_tiles]
    Image.new("RGB", (224 * columns, 224 * rows_of_tiles), (200, 30, 30)).save(out_dir / "image.png")
    model_config = load_model_config(ModelConfig(name_or_path=str(out_dir / "model")))
    builder = SampleBuilder(load_demo_tokenizer(), model_config, DataConfig(max_tiles=max_tiles, max_length=10**6))
    words = "the red circle is left of the blue square".split()

    def row(count: int) -> dict:
        question = {"from": "human", "value": "<image>\nDescribe the picture."}
        answer = " ".join((words * (count // len(words) + 1))[:count])
        return {"image": "image.png", "conversations": [question, {"from": "gpt", "value": answer}]}

    def length(count: int) -> int:
        return len(builder.build(_record(row(count), out_dir))["input_ids"])

    count = 1
    while length(count * 2) < tokens:
        count *= 2
    low, high = count, count * 2
    while low < high:  # the most words that still fit in `tokens`
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= tokens else (low, middle - 1)
    if length(low) < tokens - 2:
        raise ConfigError(f"cannot fill {tokens} tokens exactly ({length(low)})")
    path = out_dir / "train.jsonl"
    path.write_text("".join(json.dumps(row(low)) + "\n" for _ in range(rows)))
    return path


def _record(row: dict, root: Path):
    from ivl.data.samples import load_records

    path = root / "probe.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return load_records(str(path), 0)[0]


def run_case(name: str, steps: int, tmp: Path) -> dict:
    shape, overrides = CASES[name]
    case_dir = tmp / name
    (case_dir / "model").mkdir(parents=True)
    write_model(case_dir / "model", **shape)
    settings = dict(item.split("=", 1) for item in overrides)
    batch = int(settings.get("loop.batch_size", 1))
    data = write_data(case_dir, int(settings["data.max_length"]), int(settings["data.max_tiles"]), batch * steps)
    base = [f"model.name_or_path={case_dir / 'model'}", "model.dtype=float32", f"data.train={data}",
            f"loop.output_dir={case_dir / 'run'}", f"loop.max_steps={steps}", "loop.num_workers=0", "loop.batch_size=1",
            "loop.log_every=1", "stage=stage2-lora" if "stage=stage2" not in overrides else "adapter.r=16"]  # fmt: skip
    config = case_dir / "config.yaml"
    config.write_text(json.dumps(_nested(base + overrides)))
    from ivl.plan import plan_file

    plan = plan_file(str(config), [], device="cpu", memory_gib=1024)
    result = subprocess.run([sys.executable, "-c", CHILD, str(config)], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{result.stderr[-4000:]}")
    measured = json.loads(lines[-1].split(" ", 1)[1])
    predicted = plan.total_bytes
    return {
        "case": name,
        "shape": shape,
        "overrides": overrides,
        "predicted_gib": predicted / GIB,
        "measured_train_peak_gib": measured["train_peak"] / GIB,
        "measured_ru_maxrss_gib": measured["ru_maxrss"] / GIB,
        "rss_after_setup_gib": measured["after_setup"] / GIB,
        "error": predicted / measured["train_peak"] - 1,
        "plan_items_gib": {key: value / GIB for key, value in plan.items.items()},
    }


def _nested(overrides: list[str]) -> dict:
    from ivl.config import apply_override

    raw: dict = {}
    for item in overrides:
        apply_override(raw, item)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            rows.append(run_case(name, args.steps, Path(tmp)))
            row = rows[-1]
            predicted, measured = row["predicted_gib"], row["measured_train_peak_gib"]
            print(f"{name:22s} predicted {predicted:6.2f} GiB, measured {measured:6.2f} GiB ({row['error']:+6.1%})",
                  flush=True)  # fmt: skip
    print(f"\n{'case':22s} {'predicted GiB':>13s} {'measured GiB':>12s} {'error':>7s} {'ru_maxrss GiB':>13s}")
    for row in rows:
        print(f"{row['case']:22s} {row['predicted_gib']:13.2f} {row['measured_train_peak_gib']:12.2f} "
              f"{row['error']:+7.1%} {row['measured_ru_maxrss_gib']:13.2f}")  # fmt: skip
    worst = max(abs(row["error"]) for row in rows)
    print(f"worst |error| {worst:.1%} (target <= 20%)")
    if args.json:
        report = {"steps": args.steps, "worst_abs_error": worst, "cases": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
