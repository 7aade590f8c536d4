#!/usr/bin/env bash
# Reproduces Gemma-3-270M's shipped `default` gates (CPU; timings in the README): SmolLM2's recipe in
# one stage, since budget 0 is exact in adapter scope 'skipped' from the start:
#   low-rank gates (d -> 16 -> d) + a LoRA adapter (rank 16) + trained rank-16 stand-ins for skipped
#   branches, distilled from the frozen original with the teacher's top-64 log-probs cached per block
#   (the 262k-token vocabulary makes the full teacher distribution the cost), budgets drawn in
#   [0, 0.6] each step and spread over layers by the global (sensitivity x FLOPs) allocation.
# Long: run it in the background; `--resume` continues from runs/gemma3-270m-default.state.safetensors.
# THREADS=1 limits torch to one thread (to share the machine with other work).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs gateskip_core/shipped_gates
export OMP_NUM_THREADS="${THREADS:-2}"
STEPS="${STEPS:-250}"
gateskip train --model gemma3-270m --gate lowrank:16 --adapter lora:16 --distill --teacher-top-k 64 \
    --adapter-scope skipped --skip-fill lowrank:16 \
    --steps "$STEPS" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
    --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global --data builtin --seed 0 \
    --checkpoint-every 10 --val-every 1000 --int8 --no-calibrate --out runs/gemma3-270m-default.safetensors "$@"
# Calibrated thresholds fitted on the stored (int8) gates, as shipped, with the machine's threads.
OMP_NUM_THREADS="${CALIBRATION_THREADS:-2}" python3 scripts/recalibrate.py runs/gemma3-270m-default.safetensors
cp runs/gemma3-270m-default.safetensors gateskip_core/shipped_gates/
