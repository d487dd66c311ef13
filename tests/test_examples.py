"""Every walkthrough in examples/ runs as written: its ```bash and ```python blocks, in order, in one shell, from a
scratch folder that sees the repository's configs/ and examples/ (blocks tagged ```shell are shown, not run)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGHS = sorted(path for path in (ROOT / "examples").glob("*.md") if path.name != "README.md")
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def script(markdown: str) -> str:
    """The walkthrough's runnable blocks as one bash script; a python block becomes a quoted here-document."""
    parts = ["set -euo pipefail"]
    for language, body in BLOCK.findall(markdown):
        parts.append(body if language == "bash" else f"python - <<'PYTHON'\n{body}PYTHON")
    return "\n".join(parts) + "\n"


def test_blocks_are_found_in_order():
    markdown = "a\n```bash\necho 1\n```\n```shell\nnot run\n```\n```python\nprint(2)\n```\n"
    assert script(markdown) == "set -euo pipefail\necho 1\n\npython - <<'PYTHON'\nprint(2)\nPYTHON\n"


def test_every_use_has_a_walkthrough():
    assert [path.name for path in WALKTHROUGHS] == ["distillation.md", "domain_adaptation.md", "fine_tuning.md"]


@pytest.mark.parametrize("walkthrough", WALKTHROUGHS, ids=lambda path: path.stem)
def test_walkthrough_runs(walkthrough, tmp_path):
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(
        ["bash", "-c", script(walkthrough.read_text())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"{walkthrough.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
