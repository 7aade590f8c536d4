#!/usr/bin/env bash
# Reproduces the gates shipped in gateskip_core/shipped_gates/ (CPU; timings in the README).
#   default-v1: low-rank gates (d -> 16 -> d) + a LoRA adapter (rank 16, every projection), trained
#               jointly by distillation from the frozen original model, budgets drawn in [0, 0.6]
#               each step and spread over layers by the global (sensitivity x FLOPs) allocation;
#               adapter scope 'all' (every token runs the adapter and soft gates).
#               Retired from shipped_gates/ (kept in runs/).
#   default-v2: default-v1 continued for adapter scope 'skipped' (a token runs the original model
#               until its first skip, so budget 0 is the original) with trained rank-16 stand-ins for
#               skipped branches, and the teacher's top-64 log-probs cached per block.
#   default:    default-v2 continued for 1,000 steps with the pairwise ranking term and the model's own
#               chat answers as a third of the text (scripts/train_ranked_gates.sh, ~2.2 h on one thread).
# Long: run it in the background; `--resume` continues from runs/*.state.safetensors.
# THREADS=1 limits torch to one thread (to share the machine with other work).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs gateskip_core/shipped_gates
export OMP_NUM_THREADS="${THREADS:-2}"
V1_STEPS="${V1_STEPS:-270}"
STEPS="${STEPS:-400}"
if [ ! -f runs/smollm2-135m-instruct-default-v1.safetensors ]; then
    gateskip train --model smollm2-135m-instruct --gate lowrank:16 --adapter lora:16 --distill \
        --steps "$V1_STEPS" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
        --sparsity-loss l2 --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global \
        --data builtin --seed 0 --checkpoint-every 10 --val-every 50 --int8 \
        --out runs/smollm2-135m-instruct-default-v1.safetensors "$@"
fi
gateskip train --model smollm2-135m-instruct --gate lowrank:16 --adapter lora:16 --distill --teacher-top-k 64 \
    --init runs/smollm2-135m-instruct-default-v1.safetensors --adapter-scope skipped --skip-fill lowrank:16 \
    --steps "$STEPS" --seq-len 128 --batch 4 --lr 1e-2 --adapter-lr 1e-3 --sparsity-weight 0.05 \
    --budget-schedule random --skip-start 0 --skip-end 0.6 --allocation global --data builtin --seed 2 \
    --checkpoint-every 10 --val-every 1000 --int8 --out runs/smollm2-135m-instruct-default-v2.safetensors "$@"
INIT=runs/smollm2-135m-instruct-default-v2.safetensors RUNS=runs scripts/train_ranked_gates.sh "$@"
cp runs/smollm2-135m-instruct-default-v2.safetensors gateskip_core/shipped_gates/
cp runs/ranked.safetensors gateskip_core/shipped_gates/smollm2-135m-instruct-default.safetensors
