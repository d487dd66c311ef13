"""Runs that never lie: divergence stops the run before anything non-finite is saved, a resume continues only the same
run, one run per output folder, checkpoints verified before they are trusted, write failures reported in one line."""

import pytest
import torch
from safetensors.torch import load_file

import ivl.finetune.mpo
from ivl.cli import main as cli_main
from ivl.config import ConfigError, load_config
from ivl.demo.preference import write_preference_split
from ivl.distill.train import DistillConfig, run_distill
from ivl.errors import DivergenceError
from ivl.finetune.mpo import MPOConfig, run_mpo
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.model.checkpoint import list_checkpoints
from ivl.runtime import read_metrics

pytestmark = pytest.mark.slow


def sft_args(shapes, out, *overrides):
    """A deterministic fp32 run on the shapes train split (4 steps, a checkpoint every step)."""
    return [
        f"data.train={shapes / 'train.jsonl'}", "data.max_tiles=1", "data.use_thumbnail=false", "model.dtype=float32",
        "adapter.dropout=0", "optim.lr=5e-3", "optim.warmup_ratio=0", "loop.max_steps=4", "loop.log_every=1",
        "loop.num_workers=0", "loop.batch_size=4", "loop.save_every=1", "loop.keep_last=1", f"loop.output_dir={out}",
        *overrides,
    ]  # fmt: skip


def sft_config(shapes, out, *overrides):
    return load_config(SFTConfig, None, sft_args(shapes, out, *overrides))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_preference_split(root, "train", 16, 112, 112)
    return root


def mpo_config(pairs, out, *overrides):
    return load_config(MPOConfig, None, [
        f"data.train={pairs / 'train_preference.jsonl'}", "data.max_tiles=1", "data.use_thumbnail=false",
        "model.dtype=float32", "adapter.dropout=0", "optim.lr=5e-3", "optim.warmup_ratio=0", "loop.max_steps=3",
        "loop.log_every=1", "loop.num_workers=0", "loop.batch_size=4", "loop.save_every=1", "loop.keep_last=1",
        f"loop.output_dir={out}", *overrides,
    ])  # fmt: skip


def distill_config(tmp_path, *overrides):
    return load_config(DistillConfig, None, [
        "teacher.dtype=float32", "student.preset=tiny-student", "loss.last_k=2", "data.max_images=32",
        "data.shapes_size=112", "optim.lr=3e-3", "optim.warmup_ratio=0", "loop.batch_size=8", "loop.max_steps=3",
        "loop.log_every=1", "loop.num_workers=0", "loop.save_every=1", "loop.keep_last=1",
        f"loop.output_dir={tmp_path}", *overrides,
    ])  # fmt: skip


def all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(path).values())


# --- 1. divergence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_a_non_finite_learning_rate_is_a_config_error(shapes, tmp_path, value):
    with pytest.raises(ConfigError, match="optim.lr must be a finite positive number"):
        sft_config(shapes, tmp_path, f"optim.lr={value}")


def test_sft_divergence_stops_at_that_step_naming_its_rows_and_saves_nothing_non_finite(shapes, tmp_path, capsys):
    # lr 1e30: the first update throws the weights to ~1e30 (still finite), the second step's loss is not finite.
    (tmp_path / "run.yaml").write_text("{}\n")
    out = tmp_path / "out"
    code = cli_main(["sft", str(tmp_path / "run.yaml"), *sft_args(shapes, out, "optim.lr=1e30")])
    lines = capsys.readouterr().err.splitlines()  # the progress bar's last line may precede the error on its line
    error = [line[line.index("error:") :] for line in lines if "error" in line.lower()]
    assert code == 2 and len(error) == 1, error  # one line, no traceback
    assert error[0].startswith("error: step 2: the loss is") and "train.jsonl:" in error[0], error[0]
    assert "loop.on_nonfinite=skip" in error[0]
    # Nothing of step 2 was written: the step-1 checkpoint survives keep_last=1, and no final adapter exists.
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert all_finite(out / "checkpoints" / "step-000001" / "trainable.safetensors")
    assert not (out / "adapter").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]


def poison_step(monkeypatch, module, bad_step):
    """Make the loss of optimizer step `bad_step` (1-based, one micro-batch per step) NaN."""
    original, calls = module.forward_loss, []

    def forward_loss(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) != bad_step:
            return result
        return (result[0] * float("nan"), result[1]) if isinstance(result, tuple) else result * float("nan")

    monkeypatch.setattr(module, "forward_loss", forward_loss)


def test_sft_skip_mode_skips_an_isolated_bad_step_and_counts_it(shapes, tmp_path, monkeypatch):
    import ivl.finetune.sft

    poison_step(monkeypatch, ivl.finetune.sft, 2)
    run_sft(sft_config(shapes, tmp_path, "loop.on_nonfinite=skip"))
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 1]
    assert ["loss" in r for r in records] == [True, False, True, True]  # the skipped step's NaN is not logged
    assert all_finite(tmp_path / "adapter" / "adapter_model.safetensors")


def test_mpo_divergence_stops_and_names_the_pairs(pairs, tmp_path, monkeypatch):
    poison_step(monkeypatch, ivl.finetune.mpo, 2)
    with pytest.raises(
        DivergenceError, match=r"step 2: the loss is \S+ and the gradient norm nan .*train_preference\.jsonl:\d+"
    ):
        run_mpo(mpo_config(pairs, tmp_path))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not (tmp_path / "adapter").exists()


def test_distill_divergence_stops_and_names_the_tiles(tmp_path):
    with pytest.raises(DivergenceError, match=r"step 2: the loss is .* shapes:train"):
        run_distill(distill_config(tmp_path, "optim.lr=1e30"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert all_finite(tmp_path / "checkpoints" / "step-000001" / "trainable.safetensors")
    assert not (tmp_path / "student").exists()
