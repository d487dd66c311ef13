"""The "Will it fit?" table of docs/guides/memory.md: `ivl plan` on CUDA for InternVL3-1B / 2B / 8B, LoRA and QLoRA, 4k
and 8k tokens, 6 and 12 tiles (+ thumbnail), and the issue's three targets on a 24 GB card. Predictions only: no GPU
measured them.

    python bench/plan_zoo.py [--json bench/results_plan_zoo.json]

Each cell is `ivl plan configs/sft/internvl3_<size>_lora.yaml --device cuda` with the overrides in its row (batch 1,
gradient checkpointing on ViT and LLM as the configs ship; QLoRA with paged 8-bit AdamW as configs/sft/
internvl3_8b_qlora.yaml). The MPO row plans chosen + rejected rows with one ViT pass and the reference forward, as
`ivl plan` does for a config with an `mpo:` section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"LoRA": [], "QLoRA": ["adapter.qlora=true", "optim.optimizer=paged_adamw_8bit"]}
# (what, config, overrides, MPO pair rows, target GiB)
TARGETS = [
    ("InternVL3-2B LoRA, 8k tokens", "2b", ["data.max_length=8192"], False, 10),
    ("InternVL3-8B QLoRA, 4k tokens", "8b", ["data.max_length=4096", *METHODS["QLoRA"]], False, 14),
    ("InternVL3-8B MPO QLoRA, 4k tokens", "8b", ["data.max_length=4096", *METHODS["QLoRA"]], True, 20),
]


def planned_gib(size: str, overrides: list[str], pair_rows: bool = False) -> float:
    from ivl.plan import RECIPES, plan_sft

    config = RECIPES["sft"][0](str(ROOT / f"configs/sft/internvl3_{size}_lora.yaml"), overrides)
    return plan_sft(config, "cuda", 24.0, "mpo" if pair_rows else "sft", pair_rows).total_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    columns = [(tokens, tiles) for tokens in (4096, 8192) for tiles in (6, 12)]
    header = " | ".join(f"{tokens // 1024}k tokens, {tiles} tiles" for tokens, tiles in columns)
    lines = [f"| model | method | {header} |", "|---|---|" + "---|" * len(columns)]
    table = {}
    for size in ("1b", "2b", "8b"):
        for method, extra in METHODS.items():
            cells = [planned_gib(size, [*extra, f"data.max_length={tokens}", f"data.max_tiles={tiles}"])
                     for tokens, tiles in columns]  # fmt: skip
            table[f"internvl3-{size} {method}"] = dict(zip([f"{t}x{n}" for t, n in columns], cells, strict=True))
            lines.append(f"| InternVL3-{size.upper()} | {method} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += ["", "| target (24 GB card, 6 tiles) | predicted GiB | target GB | met |", "|---|---|---|---|"]
    targets = []
    for what, size, overrides, pair_rows, target in TARGETS:
        gib = planned_gib(size, overrides, pair_rows)
        met = gib * 2**30 <= target * 1e9
        targets.append({"what": what, "predicted_gib": gib, "target_gb": target, "met": met})
        lines.append(f"| {what} | {gib:.1f} | <= {target} | {'yes' if met else 'no'} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"device": "cuda", "table_gib": table, "targets": targets}, indent=2) + "\n")


if __name__ == "__main__":
    main()
