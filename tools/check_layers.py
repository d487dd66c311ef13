"""The kit's import-layer contract, checked over every `import` statement (module level and inside functions).

    entry    ivl.cli, ivl.plan, ivl.plan_proposals, ivl.demo     command line, planner, demo
    recipes  ivl.finetune | ivl.distill                           independent of each other
    core     every other ivl module                               model, image, data, losses, training pieces, config

A module may import its own layer or a lower one, never a higher one, and one recipe package never imports the other.
Recipes live in the repository's top-level `finetune/` and `distill/` folders and install as `ivl.finetune` and
`ivl.distill` (pyproject's package-dir): import-linter's graph builder finds modules by walking the root package's
folder, so it cannot see them; this checker reads the same mapping instead.

    python tools/check_layers.py [ROOT]      exit 1 and one `file:line: ...` line per violation
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Folder -> the import name its modules have once installed (pyproject.toml's [tool.setuptools.package-dir]).
FOLDERS = {"ivl": "ivl", "finetune": "ivl.finetune", "distill": "ivl.distill"}
ENTRY = ("ivl.cli", "ivl.plan", "ivl.plan_proposals", "ivl.demo")
RECIPES = ("ivl.finetune", "ivl.distill")
RANK = {"core": 0, "recipes": 1, "entry": 2}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> str | None:
    """'entry', 'recipes', 'core', or None for modules outside the kit."""
    if not _within(module, "ivl"):
        return None
    if any(_within(module, name) for name in ENTRY):
        return "entry"
    if any(_within(module, name) for name in RECIPES):
        return "recipes"
    return "core"


def recipe_of(module: str) -> str | None:
    return next((name for name in RECIPES if _within(module, name)), None)


def module_files(root: Path) -> dict[str, Path]:
    modules = {}
    for folder, name in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement; relative imports resolved against `module`."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name` may name a submodule: count both, the submodule decides its own layer.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    problems = []
    for module, path in module_files(root).items():
        layer, recipe = layer_of(module), recipe_of(module)
        for line, target in imports_of(module, path):
            target_layer = layer_of(target)
            if target_layer is None:
                continue
            where = f"{path.relative_to(root)}:{line}"
            if RANK[target_layer] > RANK[layer]:
                problems.append(f"{where}: {module} ({layer}) imports {target} ({target_layer}): layers run one way")
            elif layer == target_layer == "recipes" and recipe_of(target) != recipe:
                problems.append(f"{where}: {module} imports {target}: one recipe never imports another")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    problems = violations(root)
    for problem in problems:
        print(problem)
    count = len(module_files(root))
    print(f"import layers: {len(problems)} violations in {count} modules", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
