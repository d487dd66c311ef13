"""Runs that never lie: divergence stops the run before anything non-finite is saved, a resume continues only the same
run, one run per output folder, checkpoints verified before they are trusted, write failures reported in one line."""

import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ivl.finetune.mpo
from ivl.cli import main as cli_main
from ivl.config import ConfigError, load_config
from ivl.demo.preference import write_preference_split
from ivl.distill.train import DistillConfig, run_distill
from ivl.errors import CheckpointError, DivergenceError, OutputError
from ivl.finetune.mpo import MPOConfig, run_mpo
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.model.checkpoint import list_checkpoints
from ivl.model.integrity import verify_checkpoint
from ivl.model.load import ModelConfig, load_model
from ivl.outputs import LOCK_FILE, claim_output_dir, temporary_path
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


# --- 2. a resume continues only the same run --------------------------------------------------------------------------


def test_resume_refuses_a_changed_config_naming_the_keys_and_force_overrides(shapes, tmp_path, capsys):
    run_sft(sft_config(shapes, tmp_path, "loop.max_steps=2", "loop.keep_last=5"))
    with pytest.raises(CheckpointError, match=r"optim\.lr 0\.005 -> 0\.0001.*loop\.resume=force") as refused:
        run_sft(sft_config(shapes, tmp_path, "loop.max_steps=3", "loop.keep_last=5", "optim.lr=1e-4"))
    assert "max_steps" not in str(refused.value)  # the step budget may change
    # Keys that cannot change the weights (step budget, logging / saving cadence) may differ.
    run_sft(sft_config(shapes, tmp_path, "loop.max_steps=3", "loop.keep_last=5", "loop.log_every=2"))
    assert "step-000002 at step 2" in capsys.readouterr().out
    run_sft(sft_config(shapes, tmp_path, "loop.max_steps=4", "loop.keep_last=5", "optim.lr=1e-4", "loop.resume=force"))
    state = json.loads((tmp_path / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["run"]["config"]["optim"]["lr"] == 1e-4  # a forced resume goes on as the new run


def save_tiny_base(path, seed):
    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32", init_seed=seed))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_resume_refuses_another_base_of_the_same_shapes(shapes, tmp_path):
    base = tmp_path / "base"
    save_tiny_base(base, seed=0)
    overrides = (f"model.name_or_path={base}", "loop.max_steps=1")
    run_sft(sft_config(shapes, tmp_path / "out", *overrides))
    save_tiny_base(base, seed=1)  # same path, same shapes, other weights
    with pytest.raises(CheckpointError, match=r"other base weights .*loop\.resume=force"):
        run_sft(sft_config(shapes, tmp_path / "out", *overrides[:1], "loop.max_steps=2"))


# --- 3. one run per output folder ---------------------------------------------------------------------------------


def test_a_second_run_into_a_held_folder_refuses_naming_the_holder(shapes, tmp_path):
    with claim_output_dir(tmp_path):
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started "
        with pytest.raises(OutputError, match=re.escape(holder)):
            run_sft(sft_config(shapes, tmp_path))
        with pytest.MonkeyPatch.context() as patch:  # the other processes of a multi-process run take no lock
            patch.setenv("RANK", "1")
            with claim_output_dir(tmp_path):
                pass
    with claim_output_dir(tmp_path):  # released at the end of the run
        pass


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ivl.outputs import claim_output_dir\n"
         "with claim_output_dir(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match=f"pid {holder.pid} "):
        with claim_output_dir(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with claim_output_dir(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_temporary_names_are_unique_per_process(tmp_path):
    name = temporary_path(tmp_path / "adapter").name
    assert name.startswith(".adapter.tmp-") and name.endswith(f"-{os.getpid()}") and socket.gethostname() in name


# --- 4. checkpoint integrity ------------------------------------------------------------------------------------------


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "trainable.safetensors has": lambda step: truncate(step / "trainable.safetensors"),
    "optimizer.pt is missing": lambda step: (step / "optimizer.pt").unlink(),
    "no manifest.json": lambda step: [file.unlink() for file in step.iterdir()],
    "trainable.safetensors does not match its checksum": lambda step: flip_a_byte(step / "trainable.safetensors"),
}


def test_a_corrupt_newest_checkpoint_is_named_and_the_newest_good_one_resumed(shapes, tmp_path, capsys):
    overrides = ("loop.max_steps=3", "loop.keep_last=5")
    run_sft(sft_config(shapes, tmp_path, *overrides))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    newest = tmp_path / "checkpoints" / "step-000003"
    for reason, corrupt in CORRUPTIONS.items():
        corrupt(newest)
        with (tmp_path / "metrics.jsonl").open("a") as handle:
            handle.write('{"step": 3, "lo')  # a kill mid-write leaves the last line cut short
        capsys.readouterr()
        run_sft(sft_config(shapes, tmp_path, *overrides))
        out = capsys.readouterr().out
        assert f"checkpoint {newest} is unusable: {reason}" in out, out
        assert "step-000002 at step 2" in out
        assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == pytest.approx(losses)
        assert verify_checkpoint(newest) is None  # rewritten whole by the resumed run
    for step in list_checkpoints(tmp_path):
        flip_a_byte(step / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step-000001: optimizer\.pt does not match"):
        run_sft(sft_config(shapes, tmp_path, *overrides))


def test_manifest_lists_every_file_with_its_size_and_checksum(shapes, tmp_path):
    run_sft(sft_config(shapes, tmp_path, "loop.max_steps=1"))
    step = tmp_path / "checkpoints" / "step-000001"
    files = json.loads((step / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in step.iterdir()} - {"manifest.json"}
    for name, entry in files.items():
        assert entry == {"size": (step / name).stat().st_size,
                         "sha256": hashlib.sha256((step / name).read_bytes()).hexdigest()}  # fmt: skip


# --- 5. disk full, unwritable output ----------------------------------------------------------------------------------


def cli_error(capsys, args):
    code = cli_main(args)
    lines = capsys.readouterr().err.splitlines()
    errors = [line[line.index("error:") :] for line in lines if "error" in line.lower()]
    assert code == 2 and len(errors) == 1, lines[-20:]  # one line, no traceback
    return errors[0]


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(shapes, tmp_path, capsys,
                                                                                     monkeypatch):  # fmt: skip
    import ivl.model.checkpoint

    original, calls = ivl.model.checkpoint.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the step-2 checkpoint's weights
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(ivl.model.checkpoint, "save_file", save_file)
    (tmp_path / "run.yaml").write_text("{}\n")
    out = tmp_path / "out"
    error = cli_error(capsys, ["sft", str(tmp_path / "run.yaml"), *sft_args(shapes, out, "loop.keep_last=5")])
    assert re.fullmatch(r"error: cannot write .*trainable\.safetensors: No space left on device; the last checkpoint, "
                        r".*step-000001, is intact", error), error  # fmt: skip
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert verify_checkpoint(out / "checkpoints" / "step-000001") is None
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written leftovers


def test_a_full_disk_at_the_final_export_is_one_line(shapes, tmp_path, capsys, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("ivl.model.adapters.PeftModel.save_pretrained", no_space)
    (tmp_path / "run.yaml").write_text("{}\n")
    error = cli_error(capsys, ["sft", str(tmp_path / "run.yaml"), *sft_args(shapes, tmp_path / "out",
                                                                            "loop.max_steps=1")])  # fmt: skip
    assert re.fullmatch(r"error: cannot write .*adapter: No space left on device; .*rerun to resume", error), error
    assert not (tmp_path / "out" / "adapter").exists()


def test_an_output_path_that_is_a_file_or_unwritable_is_one_line(shapes, tmp_path, capsys, monkeypatch):
    (tmp_path / "run.yaml").write_text("{}\n")
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    error = cli_error(capsys, ["sft", str(tmp_path / "run.yaml"), *sft_args(shapes, taken)])
    assert error == f"error: loop.output_dir={taken} is a file, not a folder: choose another loop.output_dir"
    error = cli_error(capsys, ["sft", str(tmp_path / "run.yaml"), *sft_args(shapes, taken / "sub")])
    assert error.startswith(f"error: loop.output_dir={taken / 'sub'} cannot be created: "), error

    def read_only(path):  # tests run as root, where chmod does not stop writes: the open fails as it would
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr("ivl.outputs._open_lock", read_only)
    error = cli_error(capsys, ["sft", str(tmp_path / "run.yaml"), *sft_args(shapes, tmp_path / "ro")])
    assert error == f"error: loop.output_dir={tmp_path / 'ro'} is not writable: Permission denied"
