"""Peak RAM of `ivl convert`: it must stay under 2x the largest tensor plus a constant, whatever the checkpoint size.

    python bench/convert_memory.py [--layers 12] [--shard-gb 0.6] [--work-dir DIR] [--json out.json]

Writes a synthetic original-format InternLM2-based InternVL checkpoint (bf16, sharded safetensors; ViT 1024 wide x
4 layers, InternLM2 2048 wide with 16 heads / 8 kv heads, 8192 MLP, 92,553-token vocabulary, --layers LLM layers:
~2.4 GB at 12), then converts it to HF-native and back in subprocesses, each reporting its own peak RSS
(VmHWM). A third subprocess only imports the kit and loads the tokenizer: the constant. The
checkpoints are deleted afterwards. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

VIT = dict(hidden=1024, heads=16, mlp=4096, layers=4, image=448, patch=14)
LLM = dict(hidden=2048, heads=16, kv_heads=8, mlp=8192, vocab=92553)
MEASURE = """
import json, sys, time
start = time.perf_counter()
from ivl.model.convert import convert_checkpoint
from ivl.model.load import ModelConfig, load_tokenizer
if sys.argv[1] == "baseline":
    load_tokenizer(ModelConfig(name_or_path="preset:tiny"))
else:
    convert_checkpoint(sys.argv[2], sys.argv[3], to=sys.argv[1], max_shard_bytes=int(sys.argv[4]))
# VmHWM: this process image's peak RSS. getrusage's ru_maxrss would also count the parent's pages, which the child
# shares between fork and exec (Linux keeps that high-water mark across exec).
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"peak_rss_bytes": peak, "seconds": time.perf_counter() - start}))
"""


def original_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    c, d, head_dim = VIT["hidden"], LLM["hidden"], LLM["hidden"] // LLM["heads"]
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, VIT["patch"], VIT["patch"]),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, (VIT["image"] // VIT["patch"]) ** 2 + 1, c),
    }
    for i in range(VIT["layers"]):
        layer = {"attn.qkv": (3 * c, c), "attn.proj": (c, c), "mlp.fc1": (VIT["mlp"], c), "mlp.fc2": (c, VIT["mlp"])}
        for name, shape in layer.items():
            shapes[f"vision_model.encoder.layers.{i}.{name}.weight"] = shape
            shapes[f"vision_model.encoder.layers.{i}.{name}.bias"] = shape[:1]
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1", "ls2"):
            shapes[f"vision_model.encoder.layers.{i}.{name}"] = (c,)
    shapes.update({"mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,), "mlp1.1.weight": (d, 4 * c)})
    shapes.update({"mlp1.1.bias": (d,), "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,)})
    shapes["language_model.model.norm.weight"] = (d,)
    shapes["language_model.model.tok_embeddings.weight"] = (LLM["vocab"], d)
    for i in range(num_layers):
        prefix = f"language_model.model.layers.{i}."
        shapes[prefix + "attention.wqkv.weight"] = ((LLM["heads"] + 2 * LLM["kv_heads"]) * head_dim, d)
        shapes[prefix + "attention.wo.weight"] = (d, d)
        shapes[prefix + "feed_forward.w1.weight"] = (LLM["mlp"], d)
        shapes[prefix + "feed_forward.w3.weight"] = (LLM["mlp"], d)
        shapes[prefix + "feed_forward.w2.weight"] = (d, LLM["mlp"])
        shapes[prefix + "attention_norm.weight"] = (d,)
        shapes[prefix + "ffn_norm.weight"] = (d,)
    shapes["language_model.output.weight"] = (LLM["vocab"], d)
    return shapes


def original_config(num_layers: int) -> dict:
    llm = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False, "hidden_act": "silu",
        "hidden_size": LLM["hidden"], "intermediate_size": LLM["mlp"], "num_attention_heads": LLM["heads"],
        "num_key_value_heads": LLM["kv_heads"], "num_hidden_layers": num_layers, "vocab_size": LLM["vocab"],
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }  # fmt: skip
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": VIT["hidden"],
        "num_attention_heads": VIT["heads"], "intermediate_size": VIT["mlp"], "num_hidden_layers": VIT["layers"],
        "image_size": VIT["image"], "patch_size": VIT["patch"], "norm_type": "layer_norm", "layer_norm_eps": 1e-06,
        "qkv_bias": True, "qk_normalization": False, "hidden_act": "gelu", "initializer_factor": 1.0,
    }  # fmt: skip
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
        "downsample_ratio": 0.5, "force_image_size": VIT["image"], "ps_version": "v2", "select_layer": -1,
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "torch_dtype": "bfloat16", "llm_config": llm, "vision_config": vision,
    }  # fmt: skip


def write_checkpoint(path: Path, num_layers: int, shard_bytes: int) -> tuple[int, int]:
    """Write the synthetic checkpoint shard by shard; returns (total bytes, largest tensor bytes)."""
    from ivl.model.presets import load_demo_tokenizer

    path.mkdir(parents=True)
    shards, shard, size = [], {}, 0
    for name, shape in original_shapes(num_layers).items():
        tensor = torch.randn(shape, dtype=torch.bfloat16)
        if shard and size + tensor.nbytes > shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[name], size = tensor, size + tensor.nbytes
    shards.append(shard)
    weight_map, total, largest = {}, 0, 0
    for k, tensors in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
        largest = max(largest, *(t.nbytes for t in tensors.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(original_config(num_layers)))
    load_demo_tokenizer().save_pretrained(path)  # has <IMG_CONTEXT>; the vocabulary size does not matter here
    return total, largest


def measure(*args: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    completed = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=root, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="InternLM2 layers (126 MB each in bf16)")
    parser.add_argument("--shard-gb", type=float, default=0.6, help="shard size of the synthetic and converted files")
    parser.add_argument("--work-dir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ivl-convert-bench-", dir=args.work_dir))
    shard_bytes = int(args.shard_gb * 2**30)
    try:
        start = time.perf_counter()
        total, largest = write_checkpoint(work / "original", args.layers, shard_bytes)
        print(f"wrote {total / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        runs = {
            "baseline (import + tokenizer)": measure("baseline"),
            "original -> hf": measure("hf", str(work / "original"), str(work / "hf"), str(shard_bytes)),
            "hf -> original": measure("original", str(work / "hf"), str(work / "back"), str(shard_bytes)),
        }
    finally:
        shutil.rmtree(work)
    constant = runs["baseline (import + tokenizer)"]["peak_rss_bytes"]
    result = {
        "checkpoint_bytes": total,
        "largest_tensor_bytes": largest,
        "llm_layers": args.layers,
        "runs": runs,
        "bound_bytes": 2 * largest + constant,
    }
    print(f"checkpoint {total / 2**30:.2f} GiB (bf16), largest tensor {largest / 2**20:.0f} MiB")
    print(f"{'run':<30} {'peak RSS MiB':>12} {'above baseline MiB':>19} {'/ largest tensor':>17} {'s':>6}")
    for name, run in runs.items():
        peak, above = run["peak_rss_bytes"] / 2**20, (run["peak_rss_bytes"] - constant) / 2**20
        print(f"{name:<30} {peak:>12.0f} {above:>19.0f} {above * 2**20 / largest:>17.2f} {run['seconds']:>6.1f}")
    print(f"bound 2 x largest + baseline: {result['bound_bytes'] / 2**20:.0f} MiB")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
