#!/usr/bin/env bash
# The int4 continuation of scripts/quantisation_train.sh run for $STEPS steps (default 60) instead of 10,
# and its float32 equal-steps control
# (issue 36, point 1): the same recipe, resumed from the 10-step run's training state (step, gates,
# adapter, optimiser; every step's budget and rows are a function of (seed, step), so steps 11-$STEPS
# see what a fresh $STEPS-step run would), then compared on the int4 backbone with the float gates and the 10-step
# continuation on the held-out pydoc blocks:
#   docs/results/quantisation_trained_on_int4_60.csv
# Needs runs/quantisation/default-cont-{int4,fp32}.state.safetensors (STEPS=10 bash scripts/quantisation_train.sh).
# Single thread, about 13 s of one core per step for SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
STEPS="${STEPS:-60}"
RUNS="${RUNS:-runs/quantisation}"
GATESKIP="${GATESKIP:-.venv/bin/gateskip}"
for weights in int4 fp32; do  # fp32: the equal-steps control, as in scripts/quantisation_train.sh
  out="$RUNS/default-cont$STEPS-$weights.safetensors"
  state="$RUNS/default-cont$STEPS-$weights.state.safetensors"
  [ -f "$out" ] && continue
  [ -f "$state" ] || cp "$RUNS/default-cont-$weights.state.safetensors" "$state"
  # the recipe of scripts/quantisation_train.sh, word for word, but for --steps
  "$GATESKIP" train --model smollm2-135m-instruct --weights "$weights" --gate lowrank:16 --adapter lora:16 \
    --distill --teacher-top-k 64 --init gateskip_core/shipped_gates/smollm2-135m-instruct-default.safetensors \
    --adapter-scope skipped --skip-fill lowrank:16 --rank-weight 0.5 --chat-share 0.34 \
    --steps "$STEPS" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
    --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global --data builtin --seed 6 \
    --checkpoint-every 5 --val-every 1000 --int8 --no-calibrate --out "$out" --resume
done
"$GATESKIP" quality --model smollm2-135m-instruct --weights int4 --budgets 0,0.1,0.2,0.3 --blocks 8 \
  --gates "float-default=default" "int4-continued-10=$RUNS/default-cont-int4.safetensors" \
  "int4-continued-$STEPS=$RUNS/default-cont$STEPS-int4.safetensors" \
  "fp32-continued-$STEPS=$RUNS/default-cont$STEPS-fp32.safetensors" --out docs/results/quantisation_trained_on_int4_60.csv
