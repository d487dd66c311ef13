"""Rollouts for `ivl rl`: prompts with their reference fields, G sampled answers per prompt with the kit's tiling and
templates, their rewards and advantages, and the per-token log-probs of those answers under any policy.

A rollout is a collated batch of B x G sequences (prompt + sampled answer, rows grouped by prompt) in the kit's usual
form (input_ids, attention_mask, labels on the answer tokens only, uint8 tiles), so the memory-lean log-prob path
(`ivl.evaluate.batch_logps`: hidden states, then the vocabulary projection of the answer positions only) serves the
update, the old policy and the reference alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset

from ivl.data.chat import IGNORE_INDEX
from ivl.data.records import Record
from ivl.data.samples import SampleBuilder, collate_prompts, model_inputs
from ivl.evaluate import batch_logps, greedy_answers, normalise_answer
from ivl.finetune.rewards import WeightedReward, final_answer
from ivl.finetune.sampling import answer_seed, sampling_processors
from ivl.model.parts import unwrap
from ivl.rl_losses import group_advantages

MEDIA_KEYS = ("image", "images", "video", "conversations", "messages")


class PromptDataset(Dataset):
    """Generation prompts of checked records: the tokenised prompt and tiles, the question text, and the reference
    fields the rewards read (the row's other fields, and `answer` = its last assistant reply)."""

    def __init__(self, records: list[Record], builder: SampleBuilder, thinking: bool | None = None):
        self.records, self.builder, self.thinking = records, builder, thinking

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        prompt = self.builder.build_prompt(record, self.thinking)
        messages = self.builder.conversation(record).messages
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        fields = {key: value for key, value in (record.row or {}).items() if key not in MEDIA_KEYS}
        fields.setdefault("answer", prompt["reference"])
        return {**prompt, "question": question, "fields": fields}


def collate_rl_prompts(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """`collate_prompts` (left-padded) plus each prompt's question, reference fields and tile count."""
    batch = collate_prompts(samples, pad_token_id)
    batch["questions"] = [sample["question"] for sample in samples]
    batch["fields"] = [sample["fields"] for sample in samples]
    batch["tile_counts"] = [0 if sample["tiles"] is None else len(sample["tiles"]) for sample in samples]
    return batch


def repeat_groups(batch: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Each prompt's row and tiles G times, in prompt order: rows [B*G, P], tiles [G x each prompt's tiles...]."""
    tiles = batch["tiles"]
    if tiles is not None:
        tiles = torch.cat([piece for piece in tiles.split(batch["tile_counts"]) for _ in range(group_size)])
    return {"input_ids": batch["input_ids"].repeat_interleave(group_size, 0),
            "attention_mask": batch["attention_mask"].repeat_interleave(group_size, 0), "tiles": tiles}  # fmt: skip


def end_token_ids(builder: SampleBuilder) -> list[int]:
    tokenizer = builder.tokenize.tokenizer
    return sorted({tokenizer.convert_tokens_to_ids(builder.tokenize.end_token), tokenizer.eos_token_id} - {None})


def answer_mask(completion: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """completion [N, L] sampled ids -> mask [N, L]: 1 up to and including the first end token, 0 after it."""
    is_end = torch.isin(completion, torch.tensor(end_ids, device=completion.device)).long()
    ended_before = is_end.cumsum(1) - is_end  # end tokens strictly before each position
    return (ended_before == 0).long()


def answer_texts(tokenizer: Any, completion: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Each sampled answer [N, L] decoded up to and including its end token (`mask`), special tokens left out: what
    the rewards see. (Decoding the whole row with the tail zeroed would append token 0, "!" in Qwen's vocabulary.)"""
    return [tokenizer.decode(row[: int(length)], skip_special_tokens=True)
            for row, length in zip(completion, mask.sum(1), strict=True)]  # fmt: skip


@torch.no_grad()
def sample_answers(model: nn.Module, builder: SampleBuilder, repeated: dict[str, Any], options: Any,
                   device: torch.device, dtype: torch.dtype, seeds: list[int]) -> torch.Tensor:  # fmt: skip
    """Sampled continuations [N, L] of the N repeated prompts (with the KV cache: `generate`'s default), dropout off.
    Row i draws from its own stream `seeds[i]` (`ivl.finetune.sampling`), whatever rows it is batched with. The
    image-context token is never sampled: an answer holding one would give the update's forward more image tokens
    than image features."""
    generator = unwrap(model)
    was_training = generator.training
    generator.eval()
    inputs = {key: value for key, value in model_inputs(repeated, device, dtype).items() if value is not None}
    try:
        output = generator.generate(**inputs, do_sample=False, max_new_tokens=options.max_new_tokens,
                                    logits_processor=sampling_processors(options.temperature, options.top_p, seeds),
                                    eos_token_id=end_token_ids(builder),
                                    pad_token_id=builder.tokenize.tokenizer.pad_token_id,
                                    suppress_tokens=[generator.config.image_token_id])  # fmt: skip
    finally:
        generator.train(was_training)
    return output[:, repeated["input_ids"].shape[1] :]


def answer_logps(model: nn.Module, rollout: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """log pi of each sampled answer token [B*G, L] (0 on padding) under `model` as it is (mode, gradients)."""
    supervised, logps = batch_logps(model, rollout, device, dtype)
    prompt_length = rollout["prompt_length"]
    matrix = torch.zeros(rollout["answer_mask"].shape, dtype=logps.dtype, device=logps.device)
    # the hidden state at position c predicts token c + 1, answer token c + 1 - P
    return matrix.index_put((supervised.rows, supervised.cols + 1 - prompt_length), logps)


@torch.no_grad()
def frozen_logps(model: nn.Module, rollout: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 disable_adapter: bool = False) -> torch.Tensor:  # fmt: skip
    """`answer_logps` in eval mode without gradients: the old policy, or (adapters disabled) the reference."""
    was_training = model.training
    model.eval()
    try:
        with unwrap_peft(model).disable_adapter() if disable_adapter else nullcontext():
            return answer_logps(model, rollout, device, dtype)
    finally:
        model.train(was_training)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The PEFT model inside DDP / accelerate wrappers (its `disable_adapter` gives the reference policy)."""
    while not hasattr(model, "disable_adapter") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def process_answers(num_generations: int, accelerator: Accelerator) -> range:
    """The answers k of every prompt this process samples: all processes share the micro-batch's prompts and each
    takes an equal, contiguous share of every group (process r of N: k in [r G/N, (r + 1) G/N))."""
    share = num_generations // accelerator.num_processes
    return range(accelerator.process_index * share, (accelerator.process_index + 1) * share)


def whole_groups(rewards: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """This process's rewards [B, G/N] -> every process's [B, G], answers in k order (a no-op on one process): the
    group statistics of the advantages need all G rewards of each prompt."""
    gathered = accelerator.gather(rewards.to(accelerator.device)).cpu()  # [N * B, G/N], process-major
    processes, prompts = accelerator.num_processes, rewards.shape[0]
    return gathered.view(processes, prompts, -1).transpose(0, 1).reshape(prompts, -1)


def make_rollout(run: Any, batch: dict[str, Any], batch_index: int) -> dict[str, Any]:
    """Sample this process's answers to each prompt of generation micro-batch `batch_index`, score them, and return
    the rollout batch with rewards [B*G/N], advantages [B*G/N] (normalised over each whole group of G, on every
    process), the answer mask [B*G/N, L], and old / reference log-probs when the config needs them."""
    options, device, dtype = run.config.rl, run.accelerator.device, run.dtype
    answers = process_answers(options.num_generations, run.accelerator)
    prompts = len(batch["questions"])
    repeated = repeat_groups(batch, len(answers))
    seeds = [answer_seed(run.config.loop.seed, batch_index, p, k) for p in range(prompts) for k in answers]
    with run.accelerator.autocast():
        completion = sample_answers(run.model, run.builder, repeated, options, device, dtype, seeds).cpu()
    mask = answer_mask(completion, end_token_ids(run.builder))
    prompt_length = repeated["input_ids"].shape[1]
    labels = torch.cat([torch.full_like(repeated["input_ids"], IGNORE_INDEX),
                        torch.where(mask.bool(), completion, IGNORE_INDEX)], dim=1)  # fmt: skip
    texts = answer_texts(run.builder.tokenize.tokenizer, completion, mask)
    scores = [run.reward(batch["questions"][i // len(answers)], text, batch["fields"][i // len(answers)])
              for i, text in enumerate(texts)]  # fmt: skip
    rewards = torch.tensor([total for total, _ in scores])
    advantages = group_advantages(whole_groups(rewards.view(prompts, -1), run.accelerator),
                                  run.config.loss.advantage_eps)  # fmt: skip
    rollout = {"input_ids": torch.cat([repeated["input_ids"], completion], dim=1), "labels": labels,
               "attention_mask": torch.cat([repeated["attention_mask"], mask], dim=1), "tiles": repeated["tiles"],
               "prompt_length": prompt_length, "answer_mask": mask.to(device), "rewards": rewards,
               "advantages": advantages.values[:, answers.start : answers.stop].flatten().to(device),
               "scores": [s for _, s in scores], "zero_variance_groups": advantages.zero_variance_groups,
               "groups": prompts}  # fmt: skip
    with run.accelerator.autocast():
        if options.updates_per_batch > 1:  # pi_old: the policy that sampled, before this batch's first update
            rollout["old_logps"] = frozen_logps(run.model, rollout, device, dtype)
        if run.config.loss.beta > 0:
            rollout["ref_logps"] = frozen_logps(run.model, rollout, device, dtype, disable_adapter=True)
    return rollout


def reused_rollouts(run: Any, prompts: Iterator[dict[str, Any]], start: int) -> Iterator[dict[str, Any]]:
    """Endless rollouts: one generation batch (loop.grad_accum micro-batches of prompts) sampled with the policy of
    that moment, then yielded rl.updates_per_batch times (one optimizer step each). `start`: the prompt micro-batches
    already used (a resumed run's), which keys the sampling of the next."""
    batch_indices = itertools.count(start)
    while True:
        window = [make_rollout(run, next(prompts), next(batch_indices)) for _ in range(run.config.loop.grad_accum)]
        for _ in range(run.config.rl.updates_per_batch):
            yield from window


@torch.no_grad()
def evaluate_rewards(model: nn.Module, builder: SampleBuilder, dataset: PromptDataset, reward: WeightedReward,
                     accelerator: Accelerator, batch_size: int, max_new_tokens: int, dtype: torch.dtype,
                     group_by: str | None = None) -> dict[str, float]:  # fmt: skip
    """Greedy answers to the held-out prompts: {"eval_reward": mean reward, "eval_exact_match": share whose final
    answer equals the reference}, over all processes; with `group_by` (a row field, e.g. `kind`) the same two per
    value of that field too, as `eval_reward/<value>` and `eval_exact_match/<value>`."""
    generator = unwrap(model)
    was_training = generator.training
    generator.eval()
    groups = group_values(dataset, group_by)
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    totals = torch.zeros(1 + len(groups), 3, dtype=torch.float64, device=accelerator.device)
    pad = builder.tokenize.tokenizer.pad_token_id
    for start in range(0, len(indices), batch_size):
        batch = collate_rl_prompts([dataset[i] for i in indices[start : start + batch_size]], pad)
        with accelerator.autocast():
            answers = greedy_answers(generator, builder, model_inputs(batch, accelerator.device, dtype), max_new_tokens)
        totals += score_answers(batch["questions"], batch["fields"], answers, reward, groups, group_by).to(totals)
    totals = accelerator.reduce(totals, reduction="sum")
    generator.train(was_training)
    return eval_metrics(totals, groups)


def group_values(dataset: PromptDataset, field: str | None) -> list[str]:
    """The values `field` takes among the dataset's rows, sorted: the same groups, in the same order, everywhere."""
    if not field:
        return []
    return sorted({str(record.row[field]) for record in dataset.records if record.row and field in record.row})


def score_answers(questions: list[str], fields: list[dict[str, Any]], answers: list[str], reward: WeightedReward,
                  groups: list[str], group_by: str | None) -> torch.Tensor:  # fmt: skip
    """Sums [1 + len(groups), 3] of (reward, exact match, answers): row 0 over every answer, row 1 + g over the answers
    whose row has `group_by` == groups[g]."""
    totals = torch.zeros(1 + len(groups), 3, dtype=torch.float64)
    for question, reference, answer in zip(questions, fields, answers, strict=True):
        score = torch.tensor([reward(question, answer, reference)[0],
                              normalise_answer(final_answer(answer)) == normalise_answer(str(reference["answer"])),
                              1.0], dtype=torch.float64)  # fmt: skip
        totals[0] += score
        if group_by in reference:
            totals[1 + groups.index(str(reference[group_by]))] += score
    return totals


def eval_metrics(totals: torch.Tensor, groups: list[str]) -> dict[str, float]:
    """`score_answers`' sums (over all processes) -> mean reward and exact-match, overall and per group."""
    means = totals[:, :2] / totals[:, 2:].clamp(min=1)
    metrics = {"eval_reward": means[0, 0].item(), "eval_exact_match": means[0, 1].item()}
    for index, group in enumerate(groups, start=1):
        metrics[f"eval_reward/{group}"] = means[index, 0].item()
        metrics[f"eval_exact_match/{group}"] = means[index, 1].item()
    return metrics
