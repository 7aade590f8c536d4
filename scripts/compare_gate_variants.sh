#!/usr/bin/env bash
# Vector, low-rank and scalar gates at equal training (same recipe, data, steps and seed as each other),
# then their quality at equal budgets on held-out pydoc text. Writes docs/gate_variants.csv.
# STEPS (default 40) and THREADS (default 2) size it; ~10 min per variant at 40 steps on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/variants docs
export OMP_NUM_THREADS="${THREADS:-2}"
STEPS="${STEPS:-40}"
for gate in vector lowrank:16 scalar; do
  name="${gate/:/}"
  [ -f "runs/variants/$name.safetensors" ] && continue
  gateskip train --gate "$gate" --adapter lora:16 --distill --steps "$STEPS" --seq-len 128 --batch 4 --lr 1e-2 \
      --adapter-lr 1e-3 --sparsity-weight 0.05 --budget-schedule random --skip-end 0.6 --allocation uniform \
      --seed 0 --checkpoint-every 10 --val-every 1000 --no-calibrate --out "runs/variants/$name.safetensors"
done
gateskip quality --gates vector=runs/variants/vector.safetensors lowrank16=runs/variants/lowrank16.safetensors \
    scalar=runs/variants/scalar.safetensors --budgets 0,0.2,0.4 --blocks 8 --out docs/gate_variants.csv
