"""What a user sees while a command runs: no library deprecation warning on every model load, and progress as plain
lines when the output is a log rather than a terminal."""

import warnings

from ivl.model.adapters import apply_trainability, resolve_modes
from ivl.model.load import load_model
from ivl.options import AdapterConfig, ModelConfig, PartConfig, VisionPartConfig
from ivl.runtime import LogProgress, progress


def test_wrapping_a_model_in_lora_warns_nothing():
    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-112"))
    modes = resolve_modes("none", VisionPartConfig(), PartConfig(), PartConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_trainability(model, modes, VisionPartConfig(), AdapterConfig())
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_progress_in_a_log_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(LogProgress, "interval", 3600.0)  # no line between the first and the last
    bar = progress(None, 50, "sft", "step", initial=10)
    for _ in range(40):
        bar.update(1)
    bar.set_postfix({"loss": "0.3127"})
    bar.close()
    err = capsys.readouterr().err  # pytest's capture is not a terminal, as a log file is not
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0] == "sft: 10/50 step (20%)" and len(lines) == 2
    assert lines[1].startswith("sft: 50/50 step (100%), ") and lines[1].endswith("step/s, loss=0.3127")


def test_progress_over_an_iterable_reports_every_interval_and_disabled_says_nothing(capsys, monkeypatch):
    monkeypatch.setattr(LogProgress, "interval", 0.0)
    assert list(progress(range(3), 3, "eval loss", "batch")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("eval loss: 3/3 batch (100%)")
    assert len(list(progress(range(3), 3, "eval loss", "batch", enabled=False))) == 3
    assert capsys.readouterr().err == ""


def test_a_text_only_question_gets_an_answer():
    from ivl.cli import main

    assert main(["chat", "--base", "preset:tiny-112", "--max-new-tokens", "4", "what is a circle?"]) == 0


def test_gradient_checkpointing_is_enabled_without_a_deprecation_warning():
    from ivl.model.parts import model_parts
    from ivl.runtime import checkpoint_activations

    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-112"))
    llm = model_parts(model).llm
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint_activations(llm)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert any(getattr(module, "gradient_checkpointing", False) for module in llm.modules())
