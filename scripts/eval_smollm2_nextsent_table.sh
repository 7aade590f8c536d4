#!/usr/bin/env bash
# Accuracy against net compute for SmolLM2-135M-Instruct with the shipped default gates, on the shipped
# next-sentence multiple-choice tasks (held-out pydoc and legal text): scripts/eval_smollm2_table.sh's
# methods and budgets, 16 items per task (what the session's share of one core allowed). Writes
# docs/results/eval_smollm2_nextsent.csv (+ .json).
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 gateskip eval --model smollm2-135m-instruct --gates default \
    --tasks gateskip_pydoc_nextsent,gateskip_legal_nextsent --limit 16 --budgets 0,0.1,0.2,0.3 \
    --methods gateskip,random,shortgpt,shortgpt-calibration --batch-size 8 --out docs/results/eval_smollm2_nextsent.csv
