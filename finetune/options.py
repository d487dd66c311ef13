"""The fine-tuning recipes' configs (`ivl sft`, `ivl mpo`): the shared sections of `ivl.options.TrainConfig` plus
MPO's own, each option declared once with its help. Torch-free, so `ivl sft --help` answers at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ivl.config import option, section
from ivl.errors import ConfigError
from ivl.options import DataConfig, EvalSettings, TrainConfig


@dataclass
class SFTConfig(TrainConfig):
    """`ivl sft`'s config: the sections every fine-tuning recipe shares."""


@dataclass
class MPOOptions:
    """The MPO loss (w_p * DPO + w_q * BCO + w_g * SFT) and its reference policy."""

    beta: float = option(0.1, "the preference losses' temperature on the log-ratio to the reference")
    preference_weight: float = option(0.8, "w_p, the DPO term")
    quality_weight: float = option(0.2, "w_q, the BCO term")
    generation_weight: float = option(1.0, "w_g, SFT on the chosen answer")
    reward_shift: bool = option(True, "BCO's delta = running mean of past rewards; false: delta = 0 (TRL's bco_pair)")
    init_adapter: str | None = option(None, "continue training an SFT run's adapter/ (on the same base model)")
    precompute_reference: bool = option(False, "reference log-probs in one pass before training, cached on disk")
    reference_cache: str | None = option(None, "where that cache goes; null: OUTPUT/reference_logps.pt")
    validation_pairs: str | None = option(None, "held-out preference pairs (as data.train): reward accuracy and margin "
                                          "every loop.eval_every steps and at the end; null: none")  # fmt: skip

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"mpo.beta must be positive, got {self.beta}")
        if min(self.preference_weight, self.quality_weight, self.generation_weight) < 0:
            raise ConfigError("mpo.*_weight must be >= 0")
        if self.init_adapter and not self.precompute_reference:
            raise ConfigError(
                "mpo.init_adapter: the reference policy is the SFT adapter you start from, which disabling the "
                "adapter would not give; set mpo.precompute_reference=true"
            )


def refuse_packing(recipe: str, data: DataConfig, unit: str) -> None:
    """Packing and padding-free rows are SFT's: a recipe whose batches are pairs / prompts refuses them rather than
    running without them."""
    for name in ("packing", "padding_free"):
        if getattr(data, name):
            raise ConfigError(f"data.{name}: ivl {recipe} does not pack; its batches are {unit}, padded per "
                              f"micro-batch. Drop data.{name}")  # fmt: skip


@dataclass
class MPOConfig(TrainConfig):
    """`ivl mpo`'s config: the fine-tuning sections plus the MPO loss."""

    mpo: MPOOptions = section(MPOOptions)

    def validate(self) -> None:
        super().validate()
        refuse_packing("mpo", self.data, "(chosen, rejected) pairs")


@dataclass
class RLLossOptions:
    """The clipped policy-gradient loss: GSPO (one ratio per answer) or GRPO (one per token), KL to the reference."""

    level: Literal["sequence", "token"] = option("sequence", "sequence: GSPO's length-normalised ratio | token: GRPO")
    eps_low: float | None = option(None, "clip the ratio below 1 - eps_low; null: 3e-4 (sequence) / 0.2 (token)")
    eps_high: float | None = option(None, "clip the ratio above 1 + eps_high; null: 4e-4 (sequence) / 0.28 (token)")
    beta: float = option(0.0, "weight of the k3 KL to the reference (the model with adapters disabled); 0: off")
    advantage_eps: float = option(1e-4, "A = (r - mean) / (std + advantage_eps) within each prompt's answers")

    def clip_range(self) -> tuple[float, float]:
        low, high = CLIP_DEFAULTS[self.level]
        return (low if self.eps_low is None else self.eps_low, high if self.eps_high is None else self.eps_high)

    def validate(self) -> None:
        if self.beta < 0 or self.advantage_eps <= 0:
            raise ConfigError("loss.beta must be >= 0 and loss.advantage_eps > 0")
        if min(self.clip_range()) <= 0:
            raise ConfigError(f"loss.eps_low / loss.eps_high must be positive, got {self.clip_range()}")


# InternVL3.5's GSPO ranges (a geometric mean of token ratios moves little) and DAPO's clip-higher token ranges.
CLIP_DEFAULTS = {"sequence": (3e-4, 4e-4), "token": (0.2, 0.28)}


@dataclass
class RLOptions:
    """Sampling G answers per prompt with the current policy, and how often each generation batch is reused."""

    num_generations: int = option(4, "G: answers sampled per prompt (a group; advantages are relative within it)")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling: smallest token set of this probability mass; 1.0: off")
    max_new_tokens: int = option(64, "longest sampled answer (tokens)")
    updates_per_batch: int = option(1, "optimizer steps on each generation batch (old log-probs kept); 1: on-policy")
    thinking: bool | None = option(None, "InternVL3.5: true asks for <think> reasoning, false switches it off; null: "
                                   "the template's default")  # fmt: skip

    def validate(self) -> None:
        if self.num_generations < 2:
            raise ConfigError("rl.num_generations must be >= 2 (advantages compare answers to the same prompt)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ConfigError("rl.temperature must be > 0, rl.top_p in (0, 1], rl.max_new_tokens >= 1")
        if self.updates_per_batch < 1:
            raise ConfigError("rl.updates_per_batch must be >= 1")


@dataclass
class RewardOptions:
    """The reward of a sampled answer: a weighted sum of built-in rewards and your own."""

    weights: dict[str, float] = option(
        help="reward -> weight; built-in: exact_match, numeric, choice, format; yours: package.module:function",
        factory=lambda: {"exact_match": 1.0},
    )
    numeric_tolerance: float = option(1e-6, "numeric: |answer - reference| <= tolerance x max(1, |reference|)")


@dataclass
class RLEvalSettings(EvalSettings):
    """Held-out reward and exact-match of greedy answers on data.validation (at step 0, every loop.eval_every steps
    and at the end)."""

    group_by: str | None = option(None, "a row field (e.g. kind): the held-out metrics per value of it too, so a "
                                  "gain on one kind of question and a loss on another both show")  # fmt: skip


@dataclass
class RLConfig(TrainConfig):
    """`ivl rl`'s config: the fine-tuning sections, with the RL loss, sampling and rewards."""

    eval: RLEvalSettings = section(RLEvalSettings)

    loss: RLLossOptions = section(RLLossOptions)
    rl: RLOptions = section(RLOptions)
    rewards: RewardOptions = section(RewardOptions)

    def validate(self) -> None:
        super().validate()
        refuse_packing("rl", self.data, "prompts with their sampled answers")
        if self.loop.save_every % self.rl.updates_per_batch:
            raise ConfigError("loop.save_every must be a multiple of rl.updates_per_batch (checkpoints fall between "
                              "generation batches)")
