"""QLoRA loading of a mixture-of-experts checkpoint never holds its experts dense: they are quantised to NF4 one
layer at a time as transformers reads them, so the host memory a load needs stays near the 4-bit size.

The checkpoint is a tiny-architecture InternVL3.5 (Qwen3-MoE LLM) whose experts are wide enough to measure: 8 layers
of 32 experts, 100 MB of expert weights in float32, saved by plain transformers in several safetensors files. The
reference for the loaded model is the path that materialises the dense experts and quantises them afterwards
(transformers' own 4-bit loading, then `quantize_experts`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert_35 import _batch, _tiny_35_config
from transformers import InternVLForConditionalGeneration

from ivl.model.load import ModelConfig, load_model
from ivl.model.presets import load_demo_tokenizer
from ivl.model.quantize import nf4_config
from ivl.model.quantize_experts import Experts4bit, quantize_experts

pytestmark = pytest.mark.slow

EXPERTS = dict(num_hidden_layers=8, num_experts=32, moe_intermediate_size=512)  # hidden size 64

# Run in a fresh interpreter: the rise of anonymous resident memory (RssAnon: what a load allocates, not the
# checkpoint's memory-mapped file pages, which the kernel can drop) above what the process held before the load,
# sampled every millisecond while it runs. Large allocations are served by mmap and returned on free
# (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the count. The libraries a 4-bit load imports (40 MB, whatever the
# model's size) are imported before.
MEASURE = """
import json, sys, threading, time
import bitsandbytes.functional, transformers.integrations.bitsandbytes
from transformers.models.internvl import modeling_internvl
from transformers.models.qwen3_moe import modeling_qwen3_moe
from ivl.model import quantize_experts
from ivl.model.load import ModelConfig, load_model, load_tokenizer

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

config = ModelConfig(name_or_path=sys.argv[1], dtype="float32")
load_tokenizer(config)
before, peak, done = anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

thread = threading.Thread(target=sample)
thread.start()
model, _ = load_model(config, quantize_llm=True)
done.set()
thread.join()
print(json.dumps({"peak_rise": max(peak[0], anon()) - before}))
"""


def _expert_stacks(model):
    return [getattr(layer.mlp.experts, name) for layer in model.model.language_model.layers
            for name in ("gate_up_proj", "down_proj")]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = load_demo_tokenizer()
    config = _tiny_35_config(tokenizer, "qwen3_moe")
    for key, value in EXPERTS.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    for stack in _expert_stacks(model):  # transformers leaves fused experts uninitialised outside from_pretrained
        torch.nn.init.normal_(stack, std=0.05)
    path = tmp_path_factory.mktemp("moe") / "hf"
    model.save_pretrained(path, max_shard_size="30MB")  # several files, as a real checkpoint
    tokenizer.save_pretrained(path)
    dense_bytes = sum(stack.nbytes for stack in _expert_stacks(model))
    return path, dense_bytes


def test_checkpoint_is_sharded_and_written_per_expert(checkpoint):
    path, dense_bytes = checkpoint
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2
    # transformers writes Qwen3-MoE experts per expert, as the published checkpoints hold them
    assert "language_model.model.layers.0.mlp.experts.31.gate_proj.weight" in index
    assert dense_bytes == 8 * 32 * 3 * 512 * 64 * 4  # 101 MB


def test_streamed_qlora_load_gives_the_dense_then_quantised_model(checkpoint):
    path, _ = checkpoint
    model, _ = load_model(ModelConfig(name_or_path=str(path), dtype="float32"), quantize_llm=True)
    assert all(isinstance(layer.mlp.experts, Experts4bit) for layer in model.model.language_model.layers)
    # The reference: transformers' 4-bit loading (linear layers), the dense experts quantised afterwards.
    reference = InternVLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, quantization_config=nf4_config(torch.float32), device_map={"": "cpu"}
    )
    assert quantize_experts(reference, torch.float32) == 8
    for layer, expected in zip(model.model.language_model.layers, reference.model.language_model.layers, strict=True):
        for name in ("gate_up_proj_nf4", "down_proj_nf4"):
            got, want = getattr(layer.mlp.experts, name), getattr(expected.mlp.experts, name)
            assert all(torch.equal(a, b) for a, b in zip(got.buffers(), want.buffers(), strict=True))
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch(model)).logits, reference(**_batch(reference)).logits)


def test_streamed_qlora_load_never_holds_the_dense_experts(checkpoint):
    path, dense_bytes = checkpoint
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    peak_rise = json.loads(result.stdout.strip().splitlines()[-1])["peak_rise"]
    # NF4 experts are 0.13x their float32 size; reading one layer's experts and fusing them adds about 3x one layer
    # (0.25x of all eight). The dense-then-quantise load holds all of them (1x and more).
    assert peak_rise < 0.5 * dense_bytes, (peak_rise / dense_bytes, peak_rise, dense_bytes)
