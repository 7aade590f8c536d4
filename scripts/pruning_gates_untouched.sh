#!/usr/bin/env bash
# Pruning plus gates with the mix chosen on tuning blocks and reported on blocks that chose nothing
# (issue 36, point 3), SmolLM2-135M-Instruct with the shipped default gates, one thread:
# 1. the mixes chosen on the first 4 blocks of each held-out text (docs/results/pruning_gates_matched.csv,
#    written by scripts/pruning_gates.sh) against GateSkip and ShortGPT alone at 20% and 30% net, on blocks
#    5-12 of both texts, paired bootstrap intervals: docs/results/pruning_gates_untouched.csv
#    (~130 passes of 128 tokens: ~5 min of a free core);
# 2. the legal last-word cloze task (all 43 items), GateSkip, ShortGPT (calibration BI) and legal's 30%
#    choice shortgpt+gateskip:6 at b = 0.3, 0.5: docs/results/pruning_gates_eval_legal.csv (+ .json)
#    (~260 item-runs: ~5 min of a free core).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GATESKIP="${GATESKIP:-.venv/bin/gateskip}"
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" scripts/pruning_gates_untouched.py --out docs/results/pruning_gates_untouched.csv --blocks 8
"$GATESKIP" eval --model smollm2-135m-instruct --gates default --tasks gateskip_legal_lastword --limit 43 \
    --budgets 0.3,0.5 --methods gateskip,shortgpt-calibration,shortgpt+gateskip:6 \
    --batch-size 8 --out docs/results/pruning_gates_eval_legal.csv
