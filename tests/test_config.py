"""YAML + dotted overrides -> typed, validated dataclasses."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from ivl.config import ConfigError, format_config, load_config
from ivl.model.load import ModelConfig


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"

    def validate(self):
        if self.lr <= 0:
            raise ConfigError("lr must be > 0; try 1e-4 for LoRA")


@dataclass
class Run:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    tags: list[str] = field(default_factory=list)
    output_dir: str | None = None


def test_yaml_and_overrides_are_coerced_to_the_annotated_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: preset:tiny\noptim:\n  lr: 3e-4\nsteps: 5\n")
    config = load_config(Run, path, ["optim.lr=1e-4", "optim.betas=[0.8, 0.95]", "steps=7", "tags=a"])
    assert config.model.name_or_path == "preset:tiny"
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.8, 0.95)
    assert config.steps == 7 and config.tags == ["a"]
    assert "lr: 0.0001" in format_config(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("optim.lr=-1", "optim.lr must be > 0; try 1e-4 for LoRA"),
        ("optim.schedule=linear", "optim.schedule: 'linear' is not one of 'cosine', 'constant'"),
        ("steps=2.5", "steps: expected an integer"),
        ("model.name_or_path=preset:huge", "model.name_or_path: unknown preset 'huge'"),
        ("steps", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(Run, None, [override])
    assert message in str(error.value)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, bad)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("optim.betas=[-0.1, 0.999]", "optim.betas"),
        ("optim.eps=0", "optim.eps"),
        ("optim.eps=-1e-8", "optim.eps"),
        ("optim.weight_decay=-0.01", "optim.weight_decay"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
        ("loop.save_every=-10", "loop.save_every"),
        ("loop.eval_every=-1", "loop.eval_every"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=1e400", "optim.lr"),
        ("llm.lr=.nan", "llm.lr"),
        ("vision.lr=-inf", "vision.lr"),
        ("loop.epochs=.inf", "loop.epochs"),
        ("vision.lr_layer_decay=2", "vision.lr_layer_decay"),
        ("adapter.dropout=1", "adapter.dropout"),
    ],
)
def test_bad_training_values_are_one_line_naming_the_key_once(tmp_path, capsys, override, key):
    from ivl.cli import main

    config = tmp_path / "sft.yaml"
    config.write_text("model:\n  name_or_path: preset:tiny-112\ndata:\n  train: x.jsonl\n")
    assert main(["sft", str(config), override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}") and err.count("\n") == 1, err
    section = key.split(".")[0]
    assert f"{section}.{section}." not in err, err
