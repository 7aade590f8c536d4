#!/usr/bin/env bash
# Task accuracy of the shipped gates on the float32 and the int4 backbone (issue 36, point 2): the
# shipped last-word cloze tasks (held-out pydoc and legal text), the first $LIMIT items of each, at
# budget 0 and at a budget that saves about 15% net FLOPs, GateSkip's gates only.
#   docs/results/quantisation_eval_fp32.csv, docs/results/quantisation_eval_int4.csv (and their .json)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
LIMIT="${LIMIT:-30}"
GATESKIP="${GATESKIP:-.venv/bin/gateskip}"
for weights in fp32 int4; do
  "$GATESKIP" eval --model smollm2-135m-instruct --gates default --weights "$weights" \
    --tasks gateskip_pydoc_lastword,gateskip_legal_lastword --limit "$LIMIT" --budgets 0,0.25 \
    --methods gateskip --batch-size 8 --out "docs/results/quantisation_eval_$weights.csv"
done
