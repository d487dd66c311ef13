"""The "Will it fit?" table of docs/guides/memory.md: `ivl plan` on CUDA for InternVL3-1B / 2B / 8B and InternVL3.5-2B /
8B, LoRA and QLoRA, and InternVL3.5-30B-A3B QLoRA (4-bit experts), 4k and 8k tokens, 6 and 12 tiles (+ thumbnail), and
the targets on a 24 GB card. Predictions only: no GPU measured them.

    python bench/plan_zoo.py [--json bench/results_plan_zoo.json] [--only InternVL3.5]

Each cell is `ivl plan configs/sft/<model>_lora.yaml --device cuda` with the overrides in its row (batch 1, gradient
checkpointing on ViT and LLM as the configs ship; QLoRA with paged 8-bit AdamW as configs/sft/internvl3_8b_qlora.yaml);
the 30B-A3B row is configs/sft/internvl3_5_30b_a3b_qlora.yaml as shipped. The MPO row plans chosen + rejected rows with
one ViT pass and the reference forward, as `ivl plan` does for a config with an `mpo:` section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"LoRA": [], "QLoRA": ["adapter.qlora=true", "optim.optimizer=paged_adamw_8bit"]}
# (row label, config, {method: overrides})
MODELS = [
    *((f"InternVL3-{size.upper()}", f"internvl3_{size}_lora", METHODS) for size in ("1b", "2b", "8b")),
    *((f"InternVL3.5-{size.upper()}", f"internvl3_5_{size}_lora", METHODS) for size in ("2b", "8b")),
    ("InternVL3.5-30B-A3B", "internvl3_5_30b_a3b_qlora", {"QLoRA": []}),
]
# (what, config, overrides, MPO pair rows, target bytes: the issues' GB targets, and GiB ones for InternVL3.5)
TARGETS = [
    ("InternVL3-2B LoRA, 8k tokens", "internvl3_2b_lora", ["data.max_length=8192"], False, 10e9),
    ("InternVL3-8B QLoRA, 4k tokens", "internvl3_8b_lora", ["data.max_length=4096", *METHODS["QLoRA"]], False, 14e9),
    ("InternVL3-8B MPO QLoRA, 4k tokens", "internvl3_8b_lora", ["data.max_length=4096", *METHODS["QLoRA"]], True, 20e9),
    ("InternVL3.5-8B QLoRA, 4k tokens (shipped config)", "internvl3_5_8b_qlora", [], False, 12 * 2**30),
    ("InternVL3.5-30B-A3B QLoRA, 4k tokens", "internvl3_5_30b_a3b_qlora", [], False, 22 * 2**30),
]


def planned_gib(config_name: str, overrides: list[str], pair_rows: bool = False) -> float:
    from ivl.plan import RECIPES, plan_sft

    config = RECIPES["sft"][0](str(ROOT / f"configs/sft/{config_name}.yaml"), overrides)
    return plan_sft(config, "cuda", 24.0, "mpo" if pair_rows else "sft", pair_rows).total_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default="", help="only the rows and targets whose label contains this")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    columns = [(tokens, tiles) for tokens in (4096, 8192) for tiles in (6, 12)]
    header = " | ".join(f"{tokens // 1024}k tokens, {tiles} tiles" for tokens, tiles in columns)
    lines = [f"| model | method | {header} |", "|---|---|" + "---|" * len(columns)]
    table = {}
    for label, config_name, methods in MODELS:
        for method, extra in methods.items():
            if args.only not in label:
                continue
            cells = [planned_gib(config_name, [*extra, f"data.max_length={tokens}", f"data.max_tiles={tiles}"])
                     for tokens, tiles in columns]  # fmt: skip
            table[f"{label.lower()} {method}"] = dict(zip([f"{t}x{n}" for t, n in columns], cells, strict=True))
            lines.append(f"| {label} | {method} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += ["", "| target (24 GB card, 6 tiles) | predicted GiB | target | met |", "|---|---|---|---|"]
    targets = []
    for what, config_name, overrides, pair_rows, target in TARGETS:
        if args.only not in what:
            continue
        gib = planned_gib(config_name, overrides, pair_rows)
        met = gib * 2**30 <= target
        unit = f"{target / 2**30:.0f} GiB" if target % 2**30 == 0 else f"{target / 1e9:.0f} GB"
        targets.append({"what": what, "predicted_gib": gib, "target": unit, "met": met})
        lines.append(f"| {what} | {gib:.1f} | <= {unit} | {'yes' if met else 'no'} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"device": "cuda", "table_gib": table, "targets": targets}, indent=2) + "\n")


if __name__ == "__main__":
    main()
