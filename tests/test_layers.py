"""The import-layer contract (tools/check_layers.py): the kit passes it, and it catches each kind of violation."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def test_the_kit_keeps_its_layers():
    assert check_layers.violations(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"ivl/__init__.py": "", "finetune/__init__.py": "", "distill/__init__.py": "", **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_core_importing_a_recipe_even_lazily_is_caught(tmp_path):
    root = _tree(tmp_path, {
        "ivl/model/load.py": "def f():\n    from ivl.finetune.sft import run\n",
        "finetune/sft.py": "from ivl.model.load import f\n",
    })  # fmt: skip
    assert check_layers.violations(root) == [
        "ivl/model/load.py:2: ivl.model.load (core) imports ivl.finetune.sft.run (recipes): layers run one way"
    ]


def test_core_importing_an_entry_point_and_recipes_importing_each_other_are_caught(tmp_path):
    root = _tree(tmp_path, {
        "ivl/data/x.py": "import ivl.demo.run\n",
        "ivl/demo/run.py": "from ivl.finetune import sft\n",  # entry -> recipe: allowed
        "finetune/sft.py": "from ivl.distill.train import DistillConfig\n",
        "distill/train.py": "from . import losses\nfrom .losses import x\n",  # relative, same recipe: allowed
        "distill/losses.py": "from ..cli import main\n",  # resolves to ivl.cli: entry
    })  # fmt: skip
    found = check_layers.violations(root)
    assert sorted(found) == sorted([
        "ivl/data/x.py:1: ivl.data.x (core) imports ivl.demo.run (entry): layers run one way",
        "finetune/sft.py:1: ivl.finetune.sft imports ivl.distill.train.DistillConfig: one recipe never imports another",
        "distill/losses.py:1: ivl.distill.losses (recipes) imports ivl.cli.main (entry): layers run one way",
    ])  # fmt: skip


def test_the_command_exits_non_zero_on_a_violation(tmp_path):
    root = _tree(tmp_path, {"ivl/x.py": "import ivl.plan\n"})
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py"), str(root)], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 1
    assert "ivl/x.py:1: ivl.x (core) imports ivl.plan (entry)" in done.stdout
