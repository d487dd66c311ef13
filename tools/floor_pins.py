"""The lowest versions pyproject.toml allows, as pip constraints: `name==floor` for every dependency and dev tool.

pyproject.toml stays the one place the floors are written; `make test-floor` installs exactly these and runs the suite,
so a floor that does not work fails CI. torch is left out: its build depends on the machine (CPU / CUDA), and its floor
from PyPI pulls GB of CUDA wheels, so the floor venv gets the same torch as the main one (the Makefile's TORCH); its
floor is argued in pyproject.toml, not tested.

    python tools/floor_pins.py [pyproject.toml]      prints the constraints; exit 1 naming a dependency without `>=`
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

NOT_PINNED = {"torch"}
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def floor_pins(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [*project["dependencies"], *project.get("optional-dependencies", {}).get("dev", [])]
    pins = []
    for requirement in requirements:
        name, specifiers = FLOOR.match(requirement).groups()
        if name.lower() in NOT_PINNED:
            continue
        lower = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
        if len(lower) != 1:
            raise SystemExit(f"{pyproject}: dependency {requirement!r} has no single '>=' floor to test")
        pins.append(f"{name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "pyproject.toml")
    print("\n".join(floor_pins(path)))
