"""The fine-tuning recipes' configs (`ivl sft`, `ivl mpo`): the shared sections of `ivl.options.TrainConfig` plus
MPO's own, each option declared once with its help. Torch-free, so `ivl sft --help` answers at once."""

from __future__ import annotations

from dataclasses import dataclass

from ivl.config import option, section
from ivl.errors import ConfigError
from ivl.options import TrainConfig


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


@dataclass
class MPOConfig(TrainConfig):
    """`ivl mpo`'s config: the fine-tuning sections plus the MPO loss."""

    mpo: MPOOptions = section(MPOOptions)
