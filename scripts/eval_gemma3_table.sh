#!/usr/bin/env bash
# Accuracy against net compute for Gemma-3-270M with its shipped default gates, on the shipped last-word
# cloze tasks (held-out pydoc and legal text), GateSkip against random skipping and both ShortGPT variants
# at budgets 0-0.3: SmolLM2's table (scripts/eval_smollm2_table.sh) on the other model, 40 items per task.
# About 35 minutes on one thread of a core shared with ~6 other jobs (the LM head runs only on the
# continuation positions lm-eval reads: 2x faster than on every position, docs/results/eval_head_rows.csv).
# Writes docs/results/eval_gemma3.csv (+ .json).
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 gateskip eval --model gemma3-270m --gates default \
    --tasks gateskip_pydoc_lastword,gateskip_legal_lastword --limit 40 --budgets 0,0.1,0.2,0.3 \
    --methods gateskip,random,shortgpt,shortgpt-calibration --batch-size 8 --out docs/results/eval_gemma3.csv
