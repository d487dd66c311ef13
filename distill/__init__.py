"""Vision-encoder distillation (docs/design/distillation.md): an InternViT teacher (e.g. InternViT-6B) into an
InternViT-300M-shaped student. The recipe is `distill/train.py` (`ivl distill CONFIG`); `distill/cli.py` adds `cache`,
`eval` and `export`."""

import ivl  # noqa: F401  installs the kit's log filter (ivl/__init__.py) before any library is imported
