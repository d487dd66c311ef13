"""Packed micro-batches for the training loop, from a map-style or a streaming source, with a resumable state.

Samples are built in DataLoader workers; the packer runs in the training process on them, in source order. The state
(`PackedBatches.state()`) is the number of samples this process has read plus the packer's buffer and the packs
already made but not yet batched, all as sample positions, so a resumed run rebuilds exactly the same packs.

- map-style (`SFTDataset`): positions are dataset indices in `StepBatchSampler`'s seeded epoch order, one sample per
  draw, process r taking every r-th sample of each global draw; resuming restarts the sampler after the samples read.
- streaming (`StreamingSource`): positions count the rows of the stream, which starts over at its end (an endless
  run; `loop.max_steps` says how long); process r takes rows r, r + world_size, ... Resuming reads (without building)
  past the rows already read, and once more up to the buffered ones to rebuild them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ivl.config import ConfigError
from ivl.data.chat import IMG_END, IMG_START
from ivl.data.loader import StepBatchSampler
from ivl.data.packing import PackBudget, Packer, PackItem, collate_packs
from ivl.data.records import Record, iter_records, sources_for
from ivl.data.samples import SampleBuilder

Sample = dict[str, Any] | None  # None: a bad row skipped under data.on_error=skip


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Sample]:
        return index, self.dataset[index]


class StreamingSource(IterableDataset):
    """(position, sample) for this process's rows of a streamed source, from its `start`-th row on, endlessly. Workers
    take turns row by row and always yield (a skipped row as None), so the DataLoader's round robin keeps row order."""

    def __init__(self, path: str | Path, builder: SampleBuilder, rank: int = 0, world_size: int = 1, start: int = 0):
        self.path, self.builder = path, builder
        self.rank, self.world_size, self.start = rank, world_size, start

    def records(self) -> Iterator[tuple[int, Record]]:
        """(position, record) of this process's rows, endlessly; positions count the stream's rows over all passes."""
        position = 0
        for _ in count():
            for source in sources_for(self.path, self.builder.data.image_root):
                for record in iter_records(source, streaming=True):
                    if position % self.world_size == self.rank:
                        yield position, record
                    position += 1
            if position == 0:
                raise ValueError(f"{self.path}: the stream has no rows")

    def build(self, positions: set[int]) -> dict[int, Sample]:
        """The samples at some earlier positions (for the saved packing buffer)."""
        built: dict[int, Sample] = {}
        for position, record in self.records():
            if position in positions:
                built[position] = self.builder.build_indexed(record, position)
            if len(built) == len(positions):
                return built
        return built

    def __iter__(self) -> Iterator[tuple[int, Sample]]:
        worker = get_worker_info()
        shard, num_shards = (worker.id, worker.num_workers) if worker else (0, 1)
        for read, (position, record) in enumerate(self.records()):
            if read >= self.start and (read - self.start) % num_shards == shard:
                yield position, self.builder.build_indexed(record, position)


def _first(items: list[tuple[int, Sample]]) -> tuple[int, Sample]:
    return items[0]


def make_packer(builder: SampleBuilder) -> Packer:
    """The packer for `builder`'s data config; ConfigError if its token budget cannot hold the largest image."""
    data, tokenizer = builder.data, builder.tokenize.tokenizer
    image_tiles = data.max_tiles + (1 if data.use_thumbnail and data.max_tiles > 1 else 0)
    image_tokens = image_tiles * builder.tokens_per_tile + 2  # <img> + <IMG_CONTEXT> x tiles x tokens_per_tile + </img>
    if data.pack_max_tokens < image_tokens:
        raise ConfigError(
            f"data.pack_max_tokens: {data.pack_max_tokens} cannot hold one image of data.max_tiles {data.max_tiles} "
            f"({image_tokens} tokens with this model): raise it or lower data.max_tiles"
        )
    budget = PackBudget(data.pack_max_tokens, data.pack_max_tiles, data.pack_buffer_size)
    return Packer(budget, tokenizer.convert_tokens_to_ids(IMG_START), tokenizer.convert_tokens_to_ids(IMG_END))


class PackedBatches:
    """Endless collated micro-batches of `batch_size` packs each; `state()` / the `state` argument resume them."""

    def __init__(
        self,
        dataset: Dataset | StreamingSource,
        builder: SampleBuilder,
        batch_size: int,
        pad_token_id: int,
        seed: int,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, Any] | None = None,
    ):
        state = state or {"samples_read": 0, "buffer": [], "ready": []}
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.samples_read = state["samples_read"]
        self.packer = make_packer(builder)
        if isinstance(dataset, StreamingSource):
            source = StreamingSource(dataset.path, builder, rank, world_size, start=self.samples_read)
            loader = DataLoader(source, batch_size=None, num_workers=num_workers)
            rebuild: Callable[[set[int]], dict[int, Sample]] = source.build
        else:
            sampler = StepBatchSampler(len(dataset), 1, seed, rank, world_size, start=self.samples_read)
            loader = DataLoader(_Indexed(dataset), batch_sampler=sampler, num_workers=num_workers, collate_fn=_first)
            rebuild = lambda positions: {position: dataset[position] for position in positions}  # noqa: E731
        self.samples = iter(loader)
        saved = [*state["buffer"], *state["ready"]]
        built = rebuild({position for entry in saved for position, _ in entry}) if saved else {}
        self.packer.restore(state["buffer"], built.__getitem__)
        self.ready: deque[list[PackItem]] = deque(self.packer.rebuild(state["ready"], built.__getitem__))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        skipped = 0
        while len(self.ready) < self.batch_size:
            position, sample = next(self.samples)
            self.samples_read += 1
            if sample is None:
                skipped += 1
                continue
            self.ready.extend(self.packer.add(position, sample))
        packs = [self.ready.popleft() for _ in range(self.batch_size)]
        return {**collate_packs(packs, self.pad_token_id), "num_skipped": skipped}

    def state(self) -> dict[str, Any]:
        ready = [[[item.position, item.piece] for item in pack] for pack in self.ready]
        return {"samples_read": self.samples_read, "buffer": self.packer.state(), "ready": ready}


def packed_batches_of(samples: list[dict[str, Any]], builder: SampleBuilder, batch_size: int, pad_token_id: int):
    """All of a finite list of samples in packs, `batch_size` packs per collated batch (for evaluation)."""
    packer = make_packer(builder)
    packs = [pack for position, sample in enumerate(samples) for pack in packer.add(position, sample)]
    packs += packer.flush()
    for start in range(0, len(packs), batch_size):
        yield collate_packs(packs[start : start + batch_size], pad_token_id)
