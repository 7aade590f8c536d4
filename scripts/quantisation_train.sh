#!/usr/bin/env bash
# Gates trained on the int4 backbone vs the float gates on it (issue 36, point 1).
#
# The shipped `default` gates (trained on the float32 backbone) are continued for $STEPS steps with
# their own recipe (scripts/train_ranked_gates.sh: LoRA 16, low-rank gates, stand-ins, distillation,
# ranking loss), once on the int4 backbone (`--weights int4`: distilled from the int4 original,
# the model it will run as) and once on float32 (the equal-steps control: any gain of the int4
# run that the float32 run also shows is the extra steps, not the backbone). Then all three are
# compared on the int4 backbone on held-out pydoc (the validation split), gates vs random skipping:
#   docs/results/quantisation_trained_on_int4.csv
# Single thread, about 13 s of one core per step for SmolLM2 (plus loading and caching the teacher).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
STEPS="${STEPS:-20}"
RUNS="${RUNS:-runs/quantisation}"
GATESKIP="${GATESKIP:-.venv/bin/gateskip}"
mkdir -p "$RUNS" docs/results
for weights in int4 fp32; do
  out="$RUNS/default-cont-$weights.safetensors"
  [ -f "$out" ] && continue
  RESUME=()
  [ -f "$RUNS/default-cont-$weights.state.safetensors" ] && RESUME=(--resume)
  "$GATESKIP" train --model smollm2-135m-instruct --weights "$weights" --gate lowrank:16 --adapter lora:16 \
    --distill --teacher-top-k 64 --init gateskip_core/shipped_gates/smollm2-135m-instruct-default.safetensors \
    --adapter-scope skipped --skip-fill lowrank:16 --rank-weight 0.5 --chat-share 0.34 \
    --steps "$STEPS" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
    --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global --data builtin --seed 6 \
    --checkpoint-every 5 --val-every 1000 --int8 --no-calibrate --out "$out" "${RESUME[@]}"
done
"$GATESKIP" quality --model smollm2-135m-instruct --weights int4 --budgets 0,0.1,0.2,0.3 --blocks 8 \
  --gates "float-default=default" "int4-continued=$RUNS/default-cont-int4.safetensors" \
  "fp32-continued=$RUNS/default-cont-fp32.safetensors" \
  --out docs/results/quantisation_trained_on_int4.csv
