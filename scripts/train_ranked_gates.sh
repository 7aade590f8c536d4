#!/usr/bin/env bash
# The long run of the skip-signal ablation's winner, shipped as `default` (issue: gates that learn what
# a skip costs): the previous default (`default-v2`, or INIT) continued with the pairwise ranking term (--rank-weight 0.5) for STEPS steps, with
# the model's own chat answers at least a third of the training text (--chat-share 0.34).
# Long (~5 s/step on one thread): run it in the background; rerunning continues from the state file
# next to the output (RUNS/ranked.state.safetensors; keep RUNS outside the work tree to carry it across
# sessions). THREADS=1 limits torch to one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
RUNS="${RUNS:-runs}"
STEPS="${STEPS:-1000}"
mkdir -p "$RUNS"
RESUME=()
[ -f "$RUNS/ranked.state.safetensors" ] && RESUME=(--resume)
gateskip train --model smollm2-135m-instruct --gate lowrank:16 --adapter lora:16 --distill --teacher-top-k 64 \
    --init "${INIT:-gateskip_core/shipped_gates/smollm2-135m-instruct-default-v2.safetensors}" --adapter-scope skipped \
    --skip-fill lowrank:16 --rank-weight 0.5 --chat-share 0.34 \
    --steps "$STEPS" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
    --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global --data builtin --seed 4 \
    --checkpoint-every 10 --val-every 100 --int8 --out "$RUNS/ranked.safetensors" "${RESUME[@]}" "$@"
