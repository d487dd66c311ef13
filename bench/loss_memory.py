"""Peak RAM of one LoRA step at 8,192 tokens with a 151,674-entry vocabulary: the kit's memory-lean loss vs full logits.

    python bench/loss_memory.py [--tokens 8192] [--json bench/results_loss_memory.json]

A 2-layer, hidden-256 InternVL (tiny ViT, Qwen2-style LLM, InternVL3's vocabulary size) is written as a local
checkpoint; one sample of `--tokens` tokens (one 112 px tile + a long answer, every answer token supervised) is trained
for one LoRA step by the real recipe (`ivl.finetune.sft.main`, fp32) in a fresh process per variant:
- `kit`: the recipe as shipped (hidden states, supervised positions only, chunked log-probs);
- `full logits`: the same recipe with its loss swapped for the reference `token_cross_entropy` on the model's full
  [1, T, V] logits — what a plain loop does;
- `baseline`: the same process up to the loaded model, no step (python + torch + transformers + weights).
fp32 logits alone for T x V are T x 151,674 x 4 bytes (4.6 GiB at 8,192 tokens). Peak = ru_maxrss of the process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 151_674
GIB = 2**30

CHILD = """
import resource, sys
mode, config = sys.argv[1], sys.argv[2]
import ivl.finetune.sft as sft
if mode == "baseline":
    from ivl.config import load_config
    from ivl.model.load import load_model
    load_model(load_config(sft.SFTConfig, config, []).model)
else:
    if mode == "full":
        from ivl.data.samples import model_inputs
        from ivl.losses import token_cross_entropy

        def forward_loss(run, batch, denominator, *args, **kwargs):
            inputs = model_inputs(batch, run.accelerator.device, run.dtype)
            labels = inputs.pop("labels")
            return token_cross_entropy(run.model(**inputs).logits, labels, denominator)

        sft.forward_loss = forward_loss
    assert sft.main([config]) == 0
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_model(out_dir: Path) -> None:
    import torch
    from transformers import InternVLForConditionalGeneration

    from ivl.model.load import save_checkpoint
    from ivl.model.presets import load_demo_tokenizer, preset_config

    tokenizer = load_demo_tokenizer()
    config = preset_config("tiny-112", tokenizer)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 256, 1024, 4, 2
    text.head_dim = 64
    text.vocab_size = VOCAB_SIZE
    torch.manual_seed(0)
    save_checkpoint(InternVLForConditionalGeneration(config), tokenizer, out_dir)


def write_data(out_dir: Path, num_tokens: int) -> Path:
    from PIL import Image

    from ivl.model.presets import load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    Image.new("RGB", (112, 112), (200, 30, 30)).save(out_dir / "red.png")
    words, answer = "the red circle is left of the blue square".split(), []
    while len(tokenizer(" ".join(answer))["input_ids"]) < num_tokens - 60:  # room for the prompt and the tile
        answer += words * 50
    while len(tokenizer(" ".join(answer))["input_ids"]) > num_tokens - 60:
        answer.pop()
    question = {"from": "human", "value": "<image>\nDescribe the picture."}
    row = {"image": "red.png", "conversations": [question, {"from": "gpt", "value": " ".join(answer)}]}
    path = out_dir / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def write_config(out_dir: Path, model_dir: Path, data: Path, num_tokens: int) -> Path:
    config = f"""
model: {{name_or_path: {model_dir}, dtype: float32}}
adapter: {{r: 16}}
stage: stage2-lora
data: {{train: {data}, max_length: {num_tokens + 64}, max_tiles: 1, use_thumbnail: false}}
optim: {{lr: 1.0e-4}}
loop: {{output_dir: {out_dir / "run"}, batch_size: 1, max_steps: 1, save_every: 0, num_workers: 0}}
"""
    path = out_dir / "config.yaml"
    path.write_text(config)
    return path


def peak_gib(mode: str, config: Path) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(config)], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PEAK_KIB")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    return int(lines[-1].split()[1]) * 1024 / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--variants", default="baseline,kit,full", help="which runs (full needs ~4 x the fp32 logits)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model(tmp / "model")
        config = write_config(tmp, tmp / "model", write_data(tmp, args.tokens), args.tokens)
        peaks = {mode: peak_gib(mode, config) for mode in ("baseline", "kit", "full") if mode in args.variants}
    logits_gib = args.tokens * VOCAB_SIZE * 4 / GIB
    names = {"baseline": "baseline (model loaded, no step)", "kit": "kit: one LoRA step",
             "full": "full logits: one LoRA step"}  # fmt: skip
    rows = [(names[mode], peak) for mode, peak in peaks.items()]
    print(f"one LoRA step, {args.tokens} tokens, vocabulary {VOCAB_SIZE:,}, 2 layers x 256, fp32, CPU")
    print(f"fp32 logits alone: {logits_gib:.2f} GiB")
    print(f"{'run':40s} {'peak RSS GiB':>12s} {'over baseline':>14s}")
    for name, peak in rows:
        over = f"{peak - peaks['baseline']:14.2f}" if "baseline" in peaks else ""
        print(f"{name:40s} {peak:12.2f} {over}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "vocab_size": VOCAB_SIZE, "fp32_logits_gib": logits_gib,
                                         "peak_rss_gib": peaks}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
