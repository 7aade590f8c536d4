#!/usr/bin/env bash
# One recipe of the skipping-fidelity ablation (scripts/fidelity_ablation.py evaluates the result):
# continues default-v1 (low-rank gates + LoRA 16, global allocation; scripts/train_shipped_gates.sh
# writes it to runs/) or INIT for STEPS steps
# with the levers given as extra flags, e.g.
#   STEPS=60 NAME=skipped-lowrank32 scripts/train_fidelity.sh --adapter-scope skipped --skip-fill lowrank:32
# THREADS=1 limits torch to one thread (to share the machine with other work).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-runs}"
mkdir -p "$RUNS"
export OMP_NUM_THREADS="${THREADS:-2}"
NAME="${NAME:?set NAME}"
gateskip train --model smollm2-135m-instruct --gate lowrank:16 --adapter lora:16 --distill --teacher-top-k 64 \
    --init "${INIT:-runs/smollm2-135m-instruct-default-v1.safetensors}" \
    --steps "${STEPS:-60}" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
    --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global --data builtin --seed 1 \
    --checkpoint-every 10 --val-every 1000 --int8 ${CALIBRATE:---no-calibrate} --out "$RUNS/$NAME.safetensors" "$@"
