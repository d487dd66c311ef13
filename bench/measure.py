"""Measuring helpers the benches share: wall + thread CPU time of a block, two peak-memory measures (sampled process
RSS; the tensor working set from the allocator's own records), per-loop totals."""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch


@dataclass
class Measure:
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    tokens: int = 0
    samples: int = 0
    steps: int = 0
    peak_memory_gib: float = 0.0
    working_set_gib: float = 0.0
    per_round_tokens_per_second: list[float] = field(default_factory=list)
    per_round_tokens_per_cpu_second: list[float] = field(default_factory=list)


class Clock:
    """Wall and main-thread CPU seconds of a block (`wall`, `cpu` once it is left)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu


class MemoryPeak:
    """Peak memory of a block: CUDA allocator peak, or sampled process RSS above the RSS at the start."""

    def __init__(self, device: str):
        self.device, self.peak, self.stop = device, 0, threading.Event()

    def __enter__(self) -> MemoryPeak:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the baseline is what is live
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self.stop.set()
        self.thread.join()


class TensorPeak:
    """Peak bytes of the tensors allocated inside a block and alive at the same time (`peak`): on CUDA the allocator's
    peak above what was allocated at the start; on the CPU, torch.profiler's memory records (every CPU tensor
    allocation and free inside the block, in time order; tensors that existed before, such as the weights, count
    neither way). That is the training working set (activations saved for backward, logits, gradients, temporaries,
    optimizer state created inside), without the allocator's cached or fragmented pages that RSS also holds. Memory
    outside torch's allocator (BLAS packing buffers, Python objects) is not in it. The profiler slows the block: use it
    on steps that are not timed."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def __enter__(self) -> TensorPeak:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        from torch.autograd import DeviceType

        self.profiler.__exit__(*exc)
        host = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)  # as torch.profiler counts CPU memory
        records = [event for event in self.profiler.profiler.kineto_results.events()
                   if event.name() == "[memory]" and event.device_type() in host]  # fmt: skip
        live = 0
        for event in sorted(records, key=lambda event: event.start_ns()):
            live += event.nbytes()  # negative for a free
            self.peak = max(self.peak, live)
