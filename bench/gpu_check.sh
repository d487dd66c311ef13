#!/usr/bin/env bash
# One GPU check of the kit: random-weight InternVL3-2B / InternVL3.5-8B LoRA and QLoRA steps, peak memory next to
# `ivl plan`'s prediction, tokens/s next to a padded loop and TRL's SFTTrainer; writes bench/results_gpu_<device>.json.
#
#   bench/gpu_check.sh                 # on one GPU, at most 8 minutes
#   DRY=1 bench/gpu_check.sh           # CPU dry mode (tiny presets, 1 step each, JSON in a temporary folder)
#   WHEELS=wheels bench/gpu_check.sh   # first install bitsandbytes / trl / datasets from that folder, offline
#
# Extra arguments go to bench/gpu_check.py (--steps, --batch-size, --budget-s, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ -n "${WHEELS:-}" ]; then
  # The GPU machine has no internet: wheels downloaded elsewhere (bench/README.md) install with --no-index.
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" bitsandbytes trl datasets \
    || echo "gpu_check: some wheels in $WHEELS did not install; their contenders are skipped with a note"
fi
if ! "$PYTHON" -c "import ivl.finetune.sft" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .   # the kit itself, over the installed libraries
fi
args=()
if [ "${DRY:-0}" = 1 ]; then args+=(--dry); fi
exec timeout 480 "$PYTHON" bench/gpu_check.py "${args[@]}" "$@"
