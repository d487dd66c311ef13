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


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """Every selected walkthrough started at once, each in its own scratch folder, one torch thread each: most of a
    walkthrough's time is its commands' start-up (importing torch, transformers and peft, ~7 CPU s per command), so
    side by side on a few cores they finish in about the time of the longest one instead of the sum."""
    selected = [item.callspec.params["walkthrough"] for item in request.session.items
                if item.originalname == "test_walkthrough_runs"]  # fmt: skip
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    processes = {}
    for walkthrough in selected:
        folder = tmp_path_factory.mktemp(walkthrough.stem)
        for name in ("configs", "examples"):
            (folder / name).symlink_to(ROOT / name)
        # Output into files, not pipes: a full pipe would hold a walkthrough until its test reads it.
        with open(folder / "stdout.txt", "w") as stdout, open(folder / "stderr.txt", "w") as stderr:
            process = subprocess.Popen(["bash", "-c", script(walkthrough.read_text())], cwd=folder, env=env,
                                       stdout=stdout, stderr=stderr)  # fmt: skip
        processes[walkthrough.name] = (process, folder)
    yield processes
    for process, _ in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("walkthrough", WALKTHROUGHS, ids=lambda path: path.stem)
def test_walkthrough_runs(walkthrough, started):
    process, folder = started[walkthrough.name]
    process.wait(timeout=900)
    stdout, stderr = ((folder / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    assert process.returncode == 0, f"{walkthrough.name} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
