"""Micro-batches in a resumable order: which samples each process sees at every step, and where to restart.

Each epoch is a seeded permutation of the dataset; global micro-batch b takes `batch_size * world_size` consecutive
indices of it and process r the r-th slice. The position is just the number of micro-batches consumed, so a resumed
run restarts exactly where it stopped (without building the skipped samples), and the global batch of every step is
the same whatever the number of processes (for the same `batch_size * world_size`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ivl.config import ConfigError


class StepBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of dataset indices for process `rank`, starting after `start` consumed micro-batches.
    The last partial global batch of each epoch is dropped."""

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"{num_samples} training samples are fewer than one global micro-batch "
                f"({batch_size} per process x {world_size} processes): lower loop.batch_size or add data"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch = divmod(self.start, self.batches_per_epoch)
        global_size = self.batch_size * self.world_size
        while True:
            order = self.epoch_order(epoch)
            for index in range(batch, self.batches_per_epoch):
                begin = index * global_size + self.rank * self.batch_size
                yield order[begin : begin + self.batch_size].tolist()
            epoch, batch = epoch + 1, 0
