"""Evaluation: token-weighted loss over a whole set, and greedy-generation exact-match for short-answer data.

Both shard the work across processes and reduce the sums, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ivl.data.chat import SampleError
from ivl.data.packed_loader import packed_batches_of
from ivl.data.records import DataSource, Record
from ivl.data.samples import (
    SampleBuilder,
    SFTDataset,
    collate,
    collate_prompts,
    load_records,
    model_inputs,
)
from ivl.image import ImageError
from ivl.losses import SupervisedTokens, supervised_tokens, token_logps
from ivl.model.adapters import load_trained
from ivl.model.forward import causal_inputs, final_hidden_states, output_layer
from ivl.model.load import load_model
from ivl.model.packed_attention import check_packing_support, packed_forward_inputs, use_packed_attention
from ivl.model.parts import unwrap
from ivl.options import EvalConfig
from ivl.runtime import progress


class _Shard(Dataset):
    """Every `world_size`-th item of a dataset, starting at `rank`."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def _progress(accelerator: Accelerator, iterable, description: str, total: int):
    return progress(iterable, total, description, "batch", accelerator.is_main_process)


def batch_supervised(
    model: nn.Module, batch: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> SupervisedTokens:
    """The final hidden states at the supervised positions of a collated batch, padded or packed, with their targets,
    without ever building [B, T, V] logits. The labels stay where the collate put them (the CPU): the supervised
    positions are found there, with no device-to-host sync."""
    inputs = model_inputs({key: value for key, value in batch.items() if key != "labels"}, device, dtype)
    if "position_ids" in batch:
        inputs = packed_forward_inputs(inputs, batch["position_ids"])
    else:  # right-padded rows: causal attention needs no padding mask for the real tokens
        inputs = causal_inputs(inputs, batch["attention_mask"])
    return supervised_tokens(final_hidden_states(model, inputs), batch["labels"])


def batch_logps(
    model: nn.Module, batch: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> tuple[SupervisedTokens, torch.Tensor]:
    """(the supervised positions, their log p(target) [N] fp32) of a collated batch (`batch_supervised` + chunked
    `token_logps`)."""
    supervised = batch_supervised(model, batch, device, dtype)
    return supervised, token_logps(output_layer(model), supervised.hidden, supervised.targets)


def _eval_batches(shard: Dataset, batch_size: int, pad_token_id: int, packing: bool):
    if not packing:
        return DataLoader(shard, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=pad_token_id))
    check_packing_support()
    samples = [sample for sample in (shard[i] for i in range(len(shard))) if sample is not None]
    return list(packed_batches_of(samples, shard.dataset.builder, batch_size, pad_token_id))


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: Dataset,
    accelerator: Accelerator,
    batch_size: int,
    pad_token_id: int,
    dtype: torch.dtype,
    packing: bool = False,
) -> dict[str, float]:
    """{"loss": sum of token CE / number of supervised tokens over the whole set, "tokens": that number}, always
    token-averaged whatever the training `loss.reduction`. `packing`: `batch_size` packs per batch (the same loss)."""
    model = accelerator.unwrap_model(model)  # no DDP forward: a process may have no batches (uneven shards)
    was_training = model.training
    model.eval()
    shard = _Shard(dataset, accelerator.process_index, accelerator.num_processes)
    batches = _eval_batches(shard, batch_size, pad_token_id, packing)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (CE sum, tokens)
    for batch in _progress(accelerator, batches, "eval loss", len(batches)):
        if batch["input_ids"] is None:
            continue
        with accelerator.autocast():
            _, logps = batch_logps(model, batch, accelerator.device, dtype)
        totals[0] -= logps.double().sum()
        totals[1] += logps.numel()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    return {"loss": (totals[0] / totals[1].clamp(min=1)).item(), "tokens": int(totals[1].item())}


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: 'Top left.' == 'top left'."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?\"'")


def _prompts(builder: SampleBuilder, records: list[Record]) -> list[dict[str, Any]]:
    prompts = []
    for record in records:
        try:
            prompts.append(builder.build_prompt(record))
        except (SampleError, ImageError) as error:
            if builder.data.on_error != "skip":
                raise SampleError(f"{record.location}: {error}") from error
    return prompts


@torch.no_grad()
def exact_match(
    model: nn.Module,
    builder: SampleBuilder,
    records: list[Record],
    accelerator: Accelerator,
    batch_size: int,
    max_new_tokens: int,
    dtype,
) -> dict[str, Any]:
    """Greedy answers to each record's last question, compared with its reference reply after `normalise_answer`.
    -> {"exact_match": accuracy, "samples": n, "examples": [(reference, answer), ...] (the first few)}."""
    tokenizer = builder.tokenize.tokenizer
    generator = accelerator.unwrap_model(model)
    was_training = generator.training
    generator.eval()
    shard = records[accelerator.process_index :: accelerator.num_processes]
    prompts = _prompts(builder, shard)
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (correct, total)
    examples = []
    batches = range(0, len(prompts), batch_size)
    for start in _progress(accelerator, batches, "exact match", len(batches)):
        batch = collate_prompts(prompts[start : start + batch_size], tokenizer.pad_token_id)
        inputs = model_inputs(batch, accelerator.device, dtype)
        with accelerator.autocast():
            answers = greedy_answers(generator, builder, inputs, max_new_tokens)
        for reference, answer in zip(batch["references"], answers, strict=True):
            counts[0] += normalise_answer(answer) == normalise_answer(reference)
            counts[1] += 1
            if len(examples) < 5:
                examples.append((reference, answer.strip()))
    counts = accelerator.reduce(counts, reduction="sum")
    generator.train(was_training)
    total = int(counts[1].item())
    return {"exact_match": counts[0].item() / max(total, 1), "samples": total, "examples": examples}


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Loss (token-weighted over the whole set) and, unless switched off, greedy exact-match."""
    accelerator = Accelerator()
    options = config.eval
    if options.adapter:
        model, tokenizer, _ = load_trained(options.adapter, config.model, accelerator.device)
    else:
        model, tokenizer = load_model(config.model, accelerator.device)
    if config.data.packing:
        use_packed_attention(unwrap(model), config.model.attn_implementation)
    path = config.data.validation or config.data.train
    builder = SampleBuilder(tokenizer, unwrap(model).config, config.data)
    records = load_records(path, config.data.seed, config.data.image_root)
    dtype = unwrap(model).dtype
    dataset = SFTDataset(records, builder)
    result = {"data": str(path), **evaluate_loss(model, dataset, accelerator, options.batch_size,
                                                 tokenizer.pad_token_id, dtype, config.data.packing)}  # fmt: skip
    subset = options.exact_match_records(records)
    if subset:
        result.update(exact_match(model, builder, subset, accelerator, options.batch_size,
                                  options.max_new_tokens, dtype))  # fmt: skip
    return result


@torch.no_grad()
def answer_question(
    model: nn.Module,
    builder: SampleBuilder,
    question: str,
    images: list[str],
    max_new_tokens: int = 256,
    thinking: bool | None = None,
) -> str:
    """One greedy answer to `question` about `images` (paths; none for a text-only question). `thinking`: True asks
    for reasoning before the answer, False for none (thinking-mode templates), None: the template's default."""
    row = {"image": images, "conversations": [{"from": "human", "value": question}]}
    record = Record("the question", row, DataSource("chat", "chat", Path.cwd()))
    prompt = builder.build_prompt(record, thinking)
    tokenizer = builder.tokenize.tokenizer
    base = unwrap(model)
    inputs = model_inputs(collate_prompts([prompt], tokenizer.pad_token_id), base.device, base.dtype)
    return greedy_answers(model, builder, inputs, max_new_tokens)[0].strip()


def greedy_answers(model: nn.Module, builder: SampleBuilder, inputs: dict[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded, stopping at the template's end token or EOS."""
    tokenizer = builder.tokenize.tokenizer
    end_ids = sorted({tokenizer.convert_tokens_to_ids(builder.tokenize.end_token), tokenizer.eos_token_id} - {None})
    # No `pixel_values: None` for a text-only batch: transformers >= 5.24 runs the vision tower for any
    # pixel_values key before generating, and fails on None.
    output = model.generate(
        **{key: value for key, value in inputs.items() if value is not None},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
