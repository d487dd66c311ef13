"""The repository explains itself: every docs/ page a file names exists, every relative link in the documentation
resolves, and nothing points at material outside the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = re.compile(r"docs/(?:guides|design)/[a-z_]+\.md|docs/[a-z_]+\.md")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile(r"\.\./" + "shared|" + "SP" + "EC")
CHECKED = ["README.md", "DEVELOPERS.md", "docs", "examples", "ivl", "finetune", "distill", "configs", "bench", "tests"]


def tracked_files(*paths: str) -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [ROOT / name for name in listing.stdout.split()]
    return [path for path in files if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".yml", ".txt"}]


def test_named_docs_pages_exist():
    missing = [f"{path.relative_to(ROOT)}: {name}" for path in tracked_files(*CHECKED)
               for name in set(DOCS_PATH.findall(path.read_text())) if not (ROOT / name).is_file()]  # fmt: skip
    assert not missing, missing


def test_relative_links_resolve():
    pages = tracked_files("README.md", "DEVELOPERS.md", "docs", "examples", "bench/README.md")
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages if page.suffix == ".md"
              for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]  # fmt: skip
    assert not broken, broken


def test_nothing_points_outside_the_repository():
    hits = [f"{path.relative_to(ROOT)}:{number}" for path in tracked_files(*CHECKED)
            for number, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE.search(line)]  # fmt: skip
    assert not hits, hits


def test_the_pattern_finds_what_it_should():
    assert DOCS_PATH.findall("see docs/design/packing.md and docs/measurements.md.") == [
        "docs/design/packing.md", "docs/measurements.md"]  # fmt: skip
    assert LINK.findall("[a](guides/sft.md#loop) [b](https://x.org)") == ["guides/sft.md", "https://x.org"]
    assert OUTSIDE.search("see ../" + "shared/notes") and not OUTSIDE.search("the spectrum")
