"""Peak CPU memory (RSS) of one MPO training step against one SFT step at the same sequence length, with LoRA.

    OMP_NUM_THREADS=1 python bench/mpo_memory.py [--preset tiny] [--length 2048] [--batch 2]

Each mode runs in its own fresh process: load the model, apply LoRA (the kit's default: LoRA LLM, trained projector),
then measure the RSS peak of the first step above the RSS just before it (a sampling thread reads /proc/self/statm
every millisecond; a first step, because the allocator keeps freed pages and a second step would reuse them). Both
modes take log-probs through `token_logps` (no full logits). SFT: B sequences. MPO: B pairs = 2B rows sharing one
ViT pass, plus the reference pass (adapters disabled, no_grad). Weight memory is reported too: MPO holds no copy of
the model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRSS:
    def __enter__(self):
        self.start, self.peak, self.running = _rss(), _rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())


def _batch(model, rows: int, length: int, answer: int):
    image_token = model.config.image_token_id
    tokens_per_tile = 256 if model.config.vision_config.image_size[0] == 448 else 16
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, 500, (rows, length), generator=generator)
    input_ids[:, 4 : 4 + tokens_per_tile] = image_token
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer:] = input_ids[:, -answer:]
    size = model.config.vision_config.image_size[0]
    return input_ids, labels, torch.randn(1, 3, size, size, generator=generator)


def _step(mode: str, preset: str, length: int, batch: int, queue) -> None:
    torch.manual_seed(0)
    from ivl.finetune.preference import ReferencePolicy, pair_logps
    from ivl.losses import mpo_loss, supervised_tokens, token_logps
    from ivl.model.adapters import AdapterConfig, PartConfig, VisionPartConfig, apply_trainability, resolve_modes
    from ivl.model.forward import final_hidden_states, output_layer
    from ivl.model.load import ModelConfig, load_model

    model, _ = load_model(ModelConfig(name_or_path=f"preset:{preset}", dtype="float32"))
    modes = resolve_modes("none", VisionPartConfig(), PartConfig(), PartConfig())
    model = apply_trainability(model, modes, VisionPartConfig(), AdapterConfig(dropout=0.0))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = batch if mode == "sft" else 2 * batch
    input_ids, labels, pixels = _batch(model, rows, length, answer=length // 4)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def step() -> None:
        if mode == "sft":
            # One image per sequence: each row carries its own tile.
            hidden = final_hidden_states(model, {**inputs, "pixel_values": pixels.expand(rows, -1, -1, -1)})
            tokens = supervised_tokens(hidden, labels)
            loss = -token_logps(output_layer(model), tokens.hidden, tokens.targets).mean()
        else:
            pair_inputs = {**inputs, "pixel_values": pixels.expand(batch, -1, -1, -1)}
            reference = ReferencePolicy(model)(pair_inputs, labels)
            policy = pair_logps(model, pair_inputs, labels)
            sft = -policy.token_logps[policy.rows < batch].mean()
            loss, _ = mpo_loss(policy.sums[:batch], policy.sums[batch:], reference[:batch], reference[batch:], sft)
        loss.backward()
        model.zero_grad(set_to_none=True)

    with PeakRSS() as peak:
        step()
    queue.put({"mode": mode, "rows": rows, "weights_mib": weights / 2**20,
               "step_peak_above_start_mib": (peak.peak - peak.start) / 2**20})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    for mode in ("sft", "mpo"):
        queue = context.Queue()
        process = context.Process(target=_step, args=(mode, args.preset, args.length, args.batch, queue))
        process.start()
        results.append(queue.get())
        process.join()
    sft, mpo = results
    print(f"preset:{args.preset}, length {args.length}, {args.batch} sequences (SFT) vs {args.batch} pairs (MPO), LoRA")
    print(f"{'mode':<5} {'rows':>5} {'weights MiB':>12} {'step peak above start MiB':>26}")
    for row in results:
        print(
            f"{row['mode']:<5} {row['rows']:>5} {row['weights_mib']:>12.1f} {row['step_peak_above_start_mib']:>26.1f}"
        )
    ratio = mpo["step_peak_above_start_mib"] / sft["step_peak_above_start_mib"]
    print(f"MPO / SFT step peak: {ratio:.2f}x")
    print(json.dumps({"args": vars(args), "results": results, "ratio": ratio}))


if __name__ == "__main__":
    main()
