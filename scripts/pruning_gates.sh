#!/usr/bin/env bash
# Pruning plus gates (shortgpt+gateskip:K) against each part alone at matched net savings, SmolLM2-135M-Instruct
# with the shipped default gates, one thread:
# 1. held-out pydoc and legal text, 4 blocks of 128 tokens each, K = 3, 6, 9 (~25 min on 2 busy shared cores):
#    docs/results/pruning_gates.csv and docs/results/pruning_gates_matched.csv;
# 2. at ~30% net saved, 8 blocks of each text scored one by one, 95% bootstrap intervals of each method's
#    perplexity and of its difference from GateSkip alone (~15 min): docs/results/pruning_gates_paired.csv;
# 3. the shipped last-word cloze task on held-out pydoc, first 60 items, GateSkip and K = 6 at b = 0.3, 0.5 (~9 min):
#    docs/results/pruning_gates_eval.csv (+ .json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python scripts/pruning_gates.py --out docs/results/pruning_gates.csv --blocks 4 --ks 3,6,9
python scripts/pruning_gates_paired.py --out docs/results/pruning_gates_paired.csv --blocks 8
gateskip eval --model smollm2-135m-instruct --gates default --tasks gateskip_pydoc_lastword --limit 60 \
    --budgets 0.3,0.5 --methods gateskip,shortgpt+gateskip:6 \
    --batch-size 8 --out docs/results/pruning_gates_eval.csv
