"""Options a user can discover: every config field has its help, `--help` lists every key without importing torch,
`--show-config` prints loadable YAML with the help as comments, and every shipped config loads."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ivl import options as core_options
from ivl.config import ConfigError, describe, format_config, load_config
from ivl.distill import options as distill_options
from ivl.distill.options import DistillConfig
from ivl.finetune import options as finetune_options
from ivl.finetune.options import MPOConfig, RLConfig, SFTConfig
from ivl.options import DataCheckConfig, EvalConfig

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
# command -> the config classes whose options its --help lists (`ivl plan` takes any recipe's config)
HELP_COMMANDS = {
    ("sft",): (SFTConfig,),
    ("mpo",): (MPOConfig,),
    ("rl",): (RLConfig,),
    ("eval",): (EvalConfig,),
    ("distill",): (DistillConfig,),
    ("distill", "cache"): (DistillConfig,),
    ("data", "check"): (DataCheckConfig,),
    ("plan",): (SFTConfig, MPOConfig, RLConfig, DistillConfig),
}


def config_classes():
    """Every dataclass of the three option modules (not only those reachable from a recipe's config)."""
    for module in (core_options, finetune_options, distill_options):
        for _, cls in inspect.getmembers(module, dataclasses.is_dataclass):
            if cls.__module__ == module.__name__:
                yield cls


@pytest.mark.parametrize("cls", list(config_classes()), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_config_field_has_help(cls):
    assert cls.__dict__.get("__doc__"), f"{cls.__name__} needs a docstring (it is the section's help)"
    missing = [field.name for field in dataclasses.fields(cls) if not field.metadata.get("help")]
    assert not missing, f"{cls.__name__}: declare {missing} with option(default, 'help') or section(Class)"


def test_describe_gives_type_default_and_help_of_nested_keys():
    docs = {doc.key: doc for doc in describe(SFTConfig)}
    assert docs["optim.lr"].type == "float" and docs["optim.lr"].default == "0.0001" and docs["optim.lr"].help
    assert docs["optim.schedule"].type == "cosine|linear|constant"
    assert docs["optim.betas"].type == "[float, float]" and docs["optim.betas"].default == "[0.9, 0.999]"
    assert docs["data.train"].type == "str or null" and docs["data.train"].default == "null"
    assert docs["adapter.llm_layers"].type == "list of int"
    assert docs["vision.lr_layer_decay"].default == "1.0"  # the subclass's own field, after the inherited ones
    assert docs["loop"].type == "section"
    # a section whose default differs from its class's: the default shown is the section's
    assert {d.key: d for d in describe(DataCheckConfig)}["model.name_or_path"].default == "preset:tiny"


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def imported_heavy_modules(importtime_log: str) -> list[str]:
    """Top-level heavy packages in a `python -X importtime` log (its last column is the module name)."""
    names = {line.rsplit("|", 1)[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time")}
    return sorted(names & set(HEAVY))


@pytest.mark.parametrize("command", [(), *HELP_COMMANDS], ids=lambda c: " ".join(c) or "ivl")
def test_help_lists_every_option_without_importing_torch(command):
    result = run_python("-X", "importtime", "-m", "ivl.cli", *command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert imported_heavy_modules(result.stderr) == []
    classes = HELP_COMMANDS.get(command, ())
    keys = {doc.key for cls in classes for doc in describe(cls)}
    missing = sorted(key for key in keys if f"{key} (" not in result.stdout and f"{key}:" not in result.stdout)
    assert not missing, f"ivl {' '.join(command)} --help lacks {missing}"
    if classes and classes[0] not in (EvalConfig, DataCheckConfig):
        assert "optim.lr (float, default 0.0001)" in result.stdout


def test_show_config_prints_commented_yaml_that_loads_back(tmp_path):
    path = ROOT / "configs" / "sft" / "internvl3_8b_qlora.yaml"
    config = load_config(SFTConfig, path, ["optim.lr=3e-4", "loop.report_to=[tensorboard]"])
    text = format_config(config)
    assert "  lr: 0.0003  # peak learning rate" in text
    assert "loop:  # Steps, batching, precision" in text
    assert all("#" in line for line in text.splitlines()), "every key carries its help"
    (tmp_path / "shown.yaml").write_text(text)
    assert load_config(SFTConfig, tmp_path / "shown.yaml") == config
    assert yaml.safe_load(text)["adapter"]["qlora"] is True


def test_recipe_module_help_lists_the_options():
    result = run_python("-m", "ivl.finetune.mpo", "--help")
    assert result.returncode == 0 and "mpo.beta (float, default 0.1)" in result.stdout


SHIPPED = {"sft": SFTConfig, "mpo": MPOConfig, "rl": RLConfig, "distill": DistillConfig, "data": DataCheckConfig}


@pytest.mark.parametrize(
    "path", sorted(p for kind in SHIPPED for p in (ROOT / "configs" / kind).glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads_with_its_class(path):
    config = load_config(SHIPPED[path.parent.name], path)
    assert dataclasses.is_dataclass(config)


def test_every_recipe_has_shipped_real_model_configs():
    for kind in ("sft", "mpo", "rl", "distill"):
        names = [p.name for p in (ROOT / "configs" / kind).glob("*.yaml")]
        assert any(not name.startswith(("demo", "tiny")) for name in names), f"configs/{kind} has no real-model config"


def test_renamed_key_names_its_new_key():
    @dataclasses.dataclass
    class Section:
        """A section."""

        RENAMED = {"old": "other.new"}
        new: int = 0

    @dataclasses.dataclass
    class Config:
        """A config."""

        part: Section = dataclasses.field(default_factory=Section)

    with pytest.raises(ConfigError, match=r"'part.old' is now 'other.new'"):
        load_config(Config, None, ["part.old=1"])


@pytest.mark.parametrize("old", ["eval_batch_size", "exact_match_samples", "max_new_tokens"])
def test_evaluation_keys_moved_out_of_loop_fail_with_the_new_name(old):
    new = {"eval_batch_size": "batch_size"}.get(old, old)
    with pytest.raises(ConfigError, match=rf"'loop.{old}' is now 'eval.{new}'"):
        load_config(SFTConfig, None, ["data.train=x", f"loop.{old}=4"])


@pytest.mark.parametrize("cls", [EvalConfig, SFTConfig, MPOConfig])
def test_exact_match_samples_means_the_same_in_training_and_ivl_eval(cls):
    records, given = list(range(10)), ["data.train=x", "model.name_or_path=preset:tiny"]
    chosen = {}
    for value in (-1, 0, 3, 20):
        config = load_config(cls, None, [*given, f"eval.exact_match_samples={value}"])
        chosen[value] = config.eval.exact_match_records(records)
    assert chosen == {-1: records, 0: [], 3: [0, 1, 2], 20: records}
    with pytest.raises(ConfigError, match="eval.exact_match_samples: N, -1 \\(all\\) or 0 \\(off\\)"):
        load_config(cls, None, [*given, "eval.exact_match_samples=-2"])


def test_ivl_eval_reads_an_sft_configs_eval_section(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("data: {train: t.jsonl}\nmodel: {name_or_path: preset:tiny}\neval: {batch_size: 3}\nloop: {}\n")
    config = load_config(EvalConfig, path, only=("model", "data", "eval"))
    assert config.eval.batch_size == 3 and config.eval.exact_match_samples == -1  # ivl eval's default: every sample
    assert load_config(SFTConfig, path).eval.exact_match_samples == 0  # training's default: off


@pytest.mark.parametrize(
    ("override", "message"),
    [("loop.batch_size=0", "loop.batch_size must be >= 1"), ("data.max_length=8", "data.max_length: 8 is too short")],
)
def test_a_section_error_names_its_key_once(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, None, ["data.train=x", override])
    assert str(error.value).startswith(message)
