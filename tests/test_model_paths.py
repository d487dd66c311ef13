"""Local model paths never go to the hub; an adapter folder given as the base, or an adapter put on a base of other
shapes, is one line that names the right option and the base the adapter expects."""

import json

import pytest
from transformers import InternVLForConditionalGeneration

from ivl.cli import main
from ivl.errors import ModelLoadError
from ivl.model.adapters import AdapterConfig, VisionPartConfig, apply_trainability, load_trained, save_trained
from ivl.model.checkpoint import export_final
from ivl.model.load import ModelConfig, is_local_path, load_model
from ivl.model.presets import load_demo_tokenizer, preset_config


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A run's adapter/ folder (adapter files, tokenizer, ivl_training.json) for a LoRA on preset:tiny-112."""
    base = ModelConfig(name_or_path="preset:tiny-112", dtype="float32")
    model, tokenizer = load_model(base)
    modes = {"vision": "frozen", "projector": "full", "llm": "lora"}
    peft_model = apply_trainability(model, modes, VisionPartConfig(), AdapterConfig())
    info = {"recipe": "sft", "base_model": {"name_or_path": "preset:tiny-112", "dtype": "float32"}}
    return export_final(tmp_path_factory.mktemp("run") / "adapter", peft_model, tokenizer, info, save_trained)


def test_what_counts_as_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for local in ("/abs/model", "./model", "../model", "~/model", "models", "runs/a/adapter", "a/b/c"):
        assert is_local_path(local), local
    for hub in ("OpenGVLab/InternVL3-1B-hf", "org/name", "gpt2", "preset:tiny"):
        assert not is_local_path(hub), hub


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_an_adapter_folder_as_the_base_names_the_right_option(adapter, tmp_path, capsys, monkeypatch, how):
    monkeypatch.chdir(adapter.parent.parent)
    name = adapter if how == "absolute" else f"{adapter.parent.name}/adapter"
    config = tmp_path / "sft.yaml"
    config.write_text(f"model:\n  name_or_path: {name}\ndata:\n  train: x.jsonl\n")
    assert main(["sft", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a LoRA adapter folder, not a base model" in err, err
    for option in ("--adapter", "eval.adapter", "mpo.init_adapter", "preset:tiny-112"):
        assert option in err, (option, err)
    assert "huggingface.co" not in err and "internet" not in err


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(f"model:\n  name_or_path: {tmp_path / 'nothere'}\ndata:\n  train: x.jsonl\n")
    assert main(["sft", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nothere'}: no such model folder" in err and "hub" in err, err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "empty")))


def test_an_adapter_on_a_base_of_other_shapes_says_which_base_it_expects(adapter, tmp_path):
    tokenizer = load_demo_tokenizer()
    config = preset_config("tiny-112", tokenizer)
    config.text_config.hidden_size = 96  # same family, other shapes
    other = tmp_path / "other-base"
    InternVLForConditionalGeneration(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ModelLoadError) as error:
        load_trained(adapter, ModelConfig(name_or_path=str(other), dtype="float32"))
    message = str(error.value)
    assert str(other) in message and "preset:tiny-112" in message and "ivl_training.json" in message, message
    assert "\n" not in message
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    assert recorded is None or str(recorded) in message
