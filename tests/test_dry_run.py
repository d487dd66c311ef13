"""Layer-wise LR decay for the ViT and `ivl sft --dry-run` (parameter groups, learning rates, layout, memory)."""

import json
import re

import pytest

from ivl.cli import main as cli_main
from ivl.config import ConfigError, load_config
from ivl.finetune.dry_run import NF4_BITS_PER_VALUE, dry_run
from ivl.finetune.sft import SFTConfig, optimizer_groups
from ivl.model.adapters import apply_trainability
from ivl.model.load import load_model


def config(*overrides):
    return load_config(SFTConfig, None, ["data.train=unused.jsonl", "model.dtype=float32", *overrides])


def expected_depth(name: str) -> int:
    """Restated independently of parts.vision_depth: embeddings 0, encoder layer i (0-based) i + 1."""
    match = re.search(r"encoder\.layer\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    assert "embeddings." in name, name
    return 0


@pytest.mark.parametrize(
    "override, depths",
    [
        ("stage=stage1.5", {0, 1, 2}),  # full ViT: the embeddings train too
        ("vision.mode=lora", {1, 2}),
        ("vision.unfreeze_last_layers=1", {2}),
    ],
)
def test_every_vit_parameter_trains_at_lr_times_decay_to_the_layers_above_it(override, depths):
    cfg = config(override, "vision.lr_layer_decay=0.9", "vision.lr=1e-3", "optim.lr=5e-4")
    model, _ = load_model(cfg.model)
    model = apply_trainability(model, cfg.modes(), cfg.vision, cfg.adapter)
    names = {id(p): n for n, p in model.named_parameters()}
    num_layers, seen = 2, set()
    for group in optimizer_groups(model, cfg):
        for parameter in group["params"]:
            name = names[id(parameter)].replace(".modules_to_save.default.", ".")
            if group["part"] != "vision":
                assert group["lr"] == 5e-4
                continue
            seen.add(expected_depth(name))
            assert group["lr"] == 1e-3 * 0.9 ** (num_layers - expected_depth(name)), name
    assert seen == depths


def test_layer_decay_needs_a_trained_vit_and_a_value_in_range():
    with pytest.raises(ConfigError, match="the ViT is frozen, so there is nothing to decay"):
        config("vision.lr_layer_decay=0.9")
    with pytest.raises(ConfigError, match=r"vision.lr_layer_decay must be in \(0, 1\]"):
        config("vision.mode=full", "vision.lr_layer_decay=1.2")


def test_dry_run_lrs_follow_decay_exactly_on_a_24_layer_vit(tmp_path, capsys):
    overrides = [
        "model.name_or_path=preset:internvl3-1b",
        "data.train=nowhere.jsonl",
        "stage=none",
        "vision.mode=full",
        "vision.lr=1e-4",
        "vision.lr_layer_decay=0.9",
        "optim.lr=2e-5",
        "optim.weight_decay=0.05",
        f"loop.output_dir={tmp_path / 'run'}",
    ]
    assert cli_main(["sft", "configs/sft/internvl3_1b_lora.yaml", "--dry-run", "--json", *overrides]) == 0
    report = json.loads(capsys.readouterr().out)
    vision = [group for group in report["groups"] if group["part"] == "vision"]
    assert {group["depth"] for group in vision} == set(range(25))
    for group in vision:
        assert group["lr"] == 1e-4 * 0.9 ** (24 - group["depth"]), group["name"]
        assert group["decay_power"] == 24 - group["depth"]
    per_layer = {g["depth"]: 0 for g in vision}
    for group in vision:
        per_layer[group["depth"]] += group["parameters"]
    assert len({per_layer[depth] for depth in range(1, 25)}) == 1  # every InternViT-300M layer is the same size
    assert next(g for g in vision if g["depth"] == 0)["name"].startswith("vision embeddings")
    assert all(g["lr"] == 2e-5 for g in report["groups"] if g["part"] != "vision")
    assert report["memory"]["activations_included"] is False
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def _real_bytes(model) -> int:
    """Parameter bytes of a loaded model, 4-bit weights with their quantisation state."""
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


@pytest.mark.parametrize("qlora", [False, True])
def test_dry_run_memory_estimate_matches_the_loaded_model(qlora):
    cfg = config(f"adapter.qlora={str(qlora).lower()}", "adapter.kind=partial_lora")
    report = dry_run(cfg)
    model, _ = load_model(cfg.model, quantize_llm=qlora)
    model = apply_trainability(model, cfg.modes(), cfg.vision, cfg.adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    memory = {key: value * 2**30 for key, value in report["memory"].items() if key.endswith("_gib")}
    assert memory["gradients_gib"] == pytest.approx(4 * trainable)
    assert memory["optimizer_states_gib"] == pytest.approx(8 * trainable)
    real = _real_bytes(model)
    if qlora:
        # NF4's fixed cost per tensor (the 256-entry code book and rounding of the second-level absmax) is left out.
        num_quantized = sum(1 for p in model.parameters() if getattr(p, "quant_state", None) is not None)
        assert num_quantized == 14
        assert 0 <= real - memory["weights_gib"] <= 8 * num_quantized
        assert NF4_BITS_PER_VALUE == pytest.approx(4.127, abs=1e-3)
    else:
        assert memory["weights_gib"] == pytest.approx(real)
    layout = report["layout"]
    assert layout["llm"]["partial"] is True and layout["llm"]["layers"] == [0, 1] and layout["llm"]["r"] == 16
    assert layout["llm"]["quantized"] == ("nf4" if qlora else None)
    assert layout["projector"] == {"mode": "full"} and layout["vision"] == {"mode": "frozen"}


def test_dry_run_8bit_optimizer_states_and_text_report(capsys):
    overrides = ["data.train=x.jsonl", "model.dtype=float32", "optim.optimizer=adamw_8bit", "vision.mode=lora"]
    cfg = config(*overrides[2:])
    report = dry_run(cfg)
    model, _ = load_model(cfg.model)
    model = apply_trainability(model, cfg.modes(), cfg.vision, cfg.adapter)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    assert any(n >= 4096 for n in sizes) and any(n < 4096 for n in sizes)
    expected = sum(2 * n if n >= 4096 else 8 * n for n in sizes)  # bitsandbytes keeps small tensors in 32-bit
    assert report["memory"]["optimizer_states_gib"] * 2**30 == pytest.approx(expected)
    command = ["sft", "configs/sft/internvl3_1b_lora.yaml", "--dry-run", "model.name_or_path=preset:tiny-112"]
    assert cli_main([*command, *overrides, "stage=none"]) == 0
    text = capsys.readouterr().out
    assert "vision     lora" in text and "activations are not included" in text
    assert re.search(r"optimizer states .* GiB  \(adamw_8bit\)", text)
