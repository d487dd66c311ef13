"""Loop plumbing: resumable batch order, trackers, metrics and the loss plot, atomic checkpoints."""

import itertools
import json
import logging
import math

import pytest
import torch
from PIL import Image

from ivl.config import ConfigError
from ivl.data.loader import StepBatchSampler
from ivl.losses import token_cross_entropy
from ivl.model.checkpoint import CheckpointError, list_checkpoints, resolve_resume
from ivl.model.integrity import write_manifest
from ivl.options import OptimConfig
from ivl.runtime import LoopConfig, build_scheduler, make_accelerator, plot_curves


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_resumed_sampler_continues_exactly_where_it_stopped():
    full = take(StepBatchSampler(10, batch_size=3, seed=7), 9)  # 3 batches per epoch: crosses two epoch boundaries
    assert take(StepBatchSampler(10, batch_size=3, seed=7, start=4), 5) == full[4:]
    assert full[:3] != full[3:6]  # each epoch has its own order


def test_processes_split_each_global_batch_of_the_single_process_order():
    single = take(StepBatchSampler(12, batch_size=4, seed=1), 6)
    ranks = [take(StepBatchSampler(12, batch_size=2, seed=1, rank=r, world_size=2), 6) for r in range(2)]
    for step in range(6):
        assert ranks[0][step] + ranks[1][step] == single[step]


def test_too_little_data_for_one_global_batch_is_a_clear_error():
    with pytest.raises(ConfigError, match="fewer than one global micro-batch"):
        StepBatchSampler(3, batch_size=2, seed=0, world_size=2)


def test_token_cross_entropy_with_the_batch_count_is_the_mean_over_supervised_tokens():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 7]])
    picked = [(0, 0, 3), (0, 1, 4), (1, 1, 1), (1, 2, 2), (1, 3, 7)]  # (row, position, next token)
    expected = -sum(torch.log_softmax(logits[r, t], -1)[y] for r, t, y in picked) / len(picked)
    assert token_cross_entropy(logits, labels, len(picked)) == pytest.approx(expected.item(), rel=1e-6)


def test_missing_or_unknown_trackers_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker"):
        make_accelerator(LoopConfig(report_to=["nonsense"]), torch.float32)
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        make_accelerator(LoopConfig(report_to=["tensorboard"]), torch.float32)


def test_bf16_model_without_autocast_is_refused():
    with pytest.raises(ConfigError, match="mixed_precision=auto"):
        make_accelerator(LoopConfig(mixed_precision="no"), torch.bfloat16)



def test_cpu_threads_sets_torchs_thread_count_and_zero_leaves_it(tmp_path):
    default = torch.get_num_threads()
    try:
        make_accelerator(LoopConfig(cpu_threads=1, output_dir=str(tmp_path)), torch.float32)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        make_accelerator(LoopConfig(cpu_threads=0, output_dir=str(tmp_path)), torch.float32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(default)
    with pytest.raises(ConfigError, match="loop.cpu_threads must be >= 0"):
        LoopConfig(cpu_threads=-1).validate()

def test_loss_plot_is_written_from_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.9}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_curves(metrics, tmp_path / "loss.png", "test")
    assert Image.open(out).size[0] > 300
    assert plot_curves(tmp_path / "none.jsonl", tmp_path / "none.png", "empty") is None


def test_only_finished_checkpoints_count_for_resume(tmp_path):
    for name in ("step-000010", "step-000020", ".step-000030.tmp", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    for name in ("step-000010", "step-000020"):  # finished: every file, then the manifest
        for file in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json"):
            (tmp_path / "checkpoints" / name / file).write_text("{}")
        write_manifest(tmp_path / "checkpoints" / name)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010", "step-000020"]
    assert resolve_resume("auto", tmp_path).name == "step-000020"
    assert resolve_resume("never", tmp_path / "fresh") is None
    with pytest.raises(CheckpointError, match="earlier run"):
        resolve_resume("never", tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoints" / "notes"), tmp_path)


def test_only_the_bitsandbytes_kernel_hub_notice_is_filtered(caplog):
    import ivl  # noqa: F401  installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("Linear4bit: something that matters")
    assert [record.getMessage() for record in caplog.records] == ["Linear4bit: something that matters"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_over_the_rounded_up_share_of_steps_then_follow_their_formula(schedule):
    """warmup w = ceil(0.05 x 30) = 2 steps (as transformers' Trainer rounds): lr(s) = s / w for s < w; then cosine
    min + (1 - min) (1 + cos(pi (s - w) / (T - w))) / 2 with min = 0.1, linear (T - s) / (T - w), or constant 1."""
    total, warmup, floor = 30, 2, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, OptimConfig(schedule=schedule, warmup_ratio=0.05, min_lr_ratio=floor), total)
    after = {
        "cosine": lambda s: floor + (1 - floor) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2,
        "linear": lambda s: (total - s) / (total - warmup),
        "constant": lambda s: 1.0,
    }[schedule]
    for step in range(total):
        expected = step / warmup if step < warmup else after(step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-9), step
        optimizer.step()
        scheduler.step()
