#!/usr/bin/env bash
# The paper's gate comparison at equal training: individual (per-layer) vs shared (one per branch type,
# the paper's "global" gate) vector gates, and vector vs low-rank vs scalar gates. Every variant trains
# from scratch with the shipped default's recipe (adapter scope `skipped`, rank-16 stand-ins, LoRA-16,
# distillation with cached teacher top-64, the ranking term, a third chat answers), the same data order,
# budgets and seed, for STEPS steps (default 300), one after another. Long (~6-8 s/step on one thread):
# run it in the background; rerunning continues each run from its state file (RUNS/<variant>.state.*).
# Then: python scripts/gate_variants_report.py (held-out texts and shipped tasks at matched net savings).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
RUNS="${RUNS:-runs/variants}"
STEPS="${STEPS:-300}"
mkdir -p "$RUNS"
GATESKIP="${GATESKIP:-.venv/bin/gateskip}"  # a command line; word-split on purpose
train_variant() {  # name, then the gate flags
  local name="$1"; shift
  [ -f "$RUNS/$name.done" ] && return 0
  local resume=()
  [ -f "$RUNS/$name.state.safetensors" ] && resume=(--resume)
  $GATESKIP train --model smollm2-135m-instruct "$@" --adapter lora:16 --distill --teacher-top-k 64 \
      --adapter-scope skipped --skip-fill lowrank:16 --rank-weight 0.5 --chat-share 0.34 \
      --steps "$STEPS" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
      --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global --data builtin --seed 5 \
      --checkpoint-every 10 --val-every 100 --no-calibrate --out "$RUNS/$name.safetensors" "${resume[@]}"
  touch "$RUNS/$name.done"
}
train_variant vector --gate vector
train_variant vector-shared --gate vector --shared
train_variant scalar --gate scalar
train_variant lowrank16 --gate lowrank:16
