"""Evaluation: token-weighted loss over a whole set, and greedy-generation exact-match for short-answer data.

Both shard the work across processes and reduce the sums, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finetune.data.chat import SampleError
from finetune.data.records import Record
from finetune.data.samples import SampleBuilder, collate, collate_prompts, model_inputs
from finetune.losses import num_supervised_tokens, token_cross_entropy
from ivl.image import ImageError


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
    return tqdm(iterable, desc=description, total=total, leave=False, disable=not accelerator.is_main_process)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, dataset: Dataset, accelerator: Accelerator, batch_size: int, pad_token_id: int, dtype
) -> dict[str, float]:
    """{"loss": sum of token CE / number of supervised tokens over the whole set, "tokens": that number}."""
    was_training = model.training
    model.eval()
    shard = _Shard(dataset, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=pad_token_id))
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (CE sum, tokens)
    for batch in _progress(accelerator, loader, "eval loss", len(loader)):
        if batch["input_ids"] is None:
            continue
        inputs = model_inputs(batch, accelerator.device, dtype)
        labels = inputs.pop("labels")
        with accelerator.autocast():
            logits = model(**inputs).logits
        totals[0] += token_cross_entropy(logits, labels, 1.0).double()
        totals[1] += num_supervised_tokens(labels)
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
    end_ids = sorted({tokenizer.convert_tokens_to_ids(builder.tokenize.end_token), tokenizer.eos_token_id})
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (correct, total)
    examples = []
    batches = range(0, len(prompts), batch_size)
    for start in _progress(accelerator, batches, "exact match", len(batches)):
        batch = collate_prompts(prompts[start : start + batch_size], tokenizer.pad_token_id)
        inputs = model_inputs(batch, accelerator.device, dtype)
        with accelerator.autocast():
            output = generator.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for reference, answer in zip(batch["references"], answers, strict=True):
            counts[0] += normalise_answer(answer) == normalise_answer(reference)
            counts[1] += 1
            if len(examples) < 5:
                examples.append((reference, answer.strip()))
    counts = accelerator.reduce(counts, reduction="sum")
    generator.train(was_training)
    total = int(counts[1].item())
    return {"exact_match": counts[0].item() / max(total, 1), "samples": total, "examples": examples}
