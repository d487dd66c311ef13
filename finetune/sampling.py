"""Keyed sampling for `ivl rl`: answer k of prompt p of generation batch s is drawn with its own random stream, seeded
by (loop.seed, s, p, k), so the answers do not depend on how rows are batched or spread over processes.

`generate(do_sample=True)` draws every row's next token with one `torch.multinomial` call on the global RNG: which
numbers a row gets depends on the rows beside it, so 2 processes sampling G/2 answers each would sample other answers
than 1 process sampling G. Here each row instead owns a `torch.Generator`, and sampling is the Gumbel-max trick
written as an exponential race: with E_v ~ Exp(1) drawn independently per vocabulary entry,
argmax_v (log p_v - log E_v) is distributed exactly as p (p: the temperature- and top-p-warped distribution). Greedy
decoding over those perturbed scores is therefore exact sampling from the same distribution as `do_sample=True`.

Chosen over sampling on one process and scattering the answers: that would keep the other processes idle during
generation (the costly part of RL) and hold the KV cache of all G answers on one device. Keyed draws also make a
resumed run sample the same answers without restoring any RNG state. Cost: one exponential draw of vocabulary size per
row and generated token, with one small kernel per row.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


def answer_seed(seed: int, batch_index: int, prompt: int, answer: int) -> int:
    """A 63-bit seed for answer `answer` of prompt `prompt` (its position in the generation micro-batch) of generation
    micro-batch `batch_index`; distinct keys give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{batch_index}:{prompt}:{answer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class KeyedSampling(LogitsProcessor):
    """The last logits processor: adds -log E (E ~ Exp(1), from each row's own generator) to the warped scores, so
    that `generate`'s greedy argmax samples. Row i of the batch uses `seeds[i]`; every call draws one vocabulary-sized
    vector per row, also for rows that have finished (their draws are never used), so a row's draws at its t-th token
    are the same in any batch."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for {scores.shape[0]} rows")
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        race = torch.stack([torch.empty(scores.shape[1], device=scores.device).exponential_(generator=g)
                            for g in self.generators])  # fmt: skip
        tiny = torch.finfo(race.dtype).tiny  # an exact 0 draw would give +inf; any winner is equally fine there
        return scores - race.clamp(min=tiny).log()


def sampling_processors(temperature: float, top_p: float, seeds: list[int]) -> LogitsProcessorList:
    """What `generate(do_sample=False, logits_processor=...)` needs to sample each row with its own seed: temperature,
    then top-p (the order `do_sample=True` applies them in), then the keyed draw."""
    processors: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList([*processors, KeyedSampling(seeds)])
