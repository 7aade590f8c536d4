#!/usr/bin/env bash
# Task accuracy of Gemma-3-270M's shipped gates on the fp32, int8 and int4 backbone (issue 36, point 2):
# the shipped last-word cloze tasks (held-out pydoc and legal text), the first $LIMIT items of each, at
# budgets 0, 0.1 and 0.2, GateSkip's gates; then random skipping on int4 at the same budgets.
# Gemma's "fp32" is its Q4_K_M GGUF dequantised to float32 (docs/quantisation.md).
#   docs/results/quantisation_eval_gemma3_{fp32,int8,int4}.csv, quantisation_eval_gemma3_int4_random.csv
#   (and their .json). About 15 minutes of one shared core at LIMIT=20.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
LIMIT="${LIMIT:-20}"
GATESKIP="${GATESKIP:-.venv/bin/gateskip}"
run() {  # WEIGHTS METHODS BUDGETS OUT
  "$GATESKIP" eval --model gemma3-270m --gates default --weights "$1" \
    --tasks gateskip_pydoc_lastword,gateskip_legal_lastword --limit "$LIMIT" --budgets "$3" \
    --methods "$2" --batch-size 8 --out "$4"
}
for weights in fp32 int4 int8; do
  run "$weights" gateskip 0,0.1,0.2 "docs/results/quantisation_eval_gemma3_$weights.csv"
done
run int4 random 0.1,0.2 docs/results/quantisation_eval_gemma3_int4_random.csv
