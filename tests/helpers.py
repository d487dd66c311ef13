"""What several test modules share: the tiny SFT run's overrides and the 2-process launcher."""

import os
import subprocess
import sys


def tiny_run(shapes):
    """Overrides for a deterministic 4-step fp32 run on the shapes train split."""
    return [
        f"data.train={shapes / 'train.jsonl'}",
        "data.max_tiles=1",
        "data.use_thumbnail=false",
        "model.dtype=float32",
        "adapter.dropout=0",
        "optim.lr=5e-3",
        "optim.warmup_ratio=0",
        "loop.max_steps=4",
        "loop.log_every=1",
        "loop.num_workers=0",
    ]


def torchrun(
    *arguments: str, processes: int = 2, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone` with `processes` CPU workers: its rendezvous binds a port the system picks, so runs never
    collide with each other or with whatever else holds a port (a fixed --master_port failed with EADDRINUSE)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *arguments]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(environment or {})}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed
