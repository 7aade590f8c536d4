#!/usr/bin/env bash
# Accuracy against net compute for SmolLM2-135M-Instruct with the shipped default gates, on the shipped
# last-word cloze tasks (held-out pydoc and legal text), GateSkip against random skipping and both ShortGPT
# variants at budgets 0-0.3 (60 items per task, one thread: ~12 min on 2 shared cores). Writes docs/results/eval_smollm2.csv (+ .json).
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 gateskip eval --model smollm2-135m-instruct --gates default \
    --tasks gateskip_pydoc_lastword,gateskip_legal_lastword --limit 60 --budgets 0,0.1,0.2,0.3 \
    --methods gateskip,random,shortgpt,shortgpt-calibration --batch-size 8 --out docs/results/eval_smollm2.csv
