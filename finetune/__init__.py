"""The recipes: SFT (`finetune/sft.py`), MPO (`finetune/mpo.py`), evaluation, losses and data."""

import ivl  # noqa: F401  installs the kit's log filter (ivl/__init__.py) before any library is imported
