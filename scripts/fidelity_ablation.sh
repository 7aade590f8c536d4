#!/usr/bin/env bash
# The skipping-fidelity ablation in the README (docs/results/fidelity_ablation*.csv): four recipes at equal
# steps (60, continuing the previous default gates; adapter scope all | skipped x stand-in zero |
# lowrank:32), stand-ins fitted without training to the previous default, and the previous default
# itself in both scopes, on held-out pydoc and legal text against ShortGPT (both block-influence
# texts). About 45 minutes on one thread of this machine (training ~8 s/step).
set -euo pipefail
cd "$(dirname "$0")/.."
export THREADS="${THREADS:-1}" OMP_NUM_THREADS="${THREADS:-1}"
# default-v1 no longer ships: scripts/train_shipped_gates.sh writes it to runs/.
PREV="${PREV:-runs/smollm2-135m-instruct-default-v1.safetensors}"
[ -f "$PREV" ] || { echo "fidelity_ablation.sh: $PREV is missing: run scripts/train_shipped_gates.sh first" >&2; exit 2; }
for scope in skipped all; do
    STEPS=60 NAME="abl-$scope-zero" INIT="$PREV" scripts/train_fidelity.sh --adapter-scope "$scope"
    STEPS=60 NAME="abl-$scope-lowrank32" INIT="$PREV" scripts/train_fidelity.sh --adapter-scope "$scope" --skip-fill lowrank:32
    gateskip fit-fill --gates "$PREV" --fill lowrank:32 --adapter-scope "$scope" --no-calibrate --out "runs/fit-$scope-lowrank32.safetensors"
done
gateskip fit-fill --gates "$PREV" --fill mean --adapter-scope skipped --no-calibrate --out runs/fit-skipped-mean.safetensors
python3 scripts/fidelity_ablation.py --out docs/results/fidelity_ablation.csv \
    previous-all="$PREV@all" previous-skipped="$PREV@skipped" \
    skipped-zero=runs/abl-skipped-zero.safetensors skipped-lowrank32=runs/abl-skipped-lowrank32.safetensors \
    all-zero=runs/abl-all-zero.safetensors all-lowrank32=runs/abl-all-lowrank32.safetensors \
    fit-skipped-lowrank32=runs/fit-skipped-lowrank32.safetensors fit-all-lowrank32=runs/fit-all-lowrank32.safetensors \
    fit-skipped-mean=runs/fit-skipped-mean.safetensors
