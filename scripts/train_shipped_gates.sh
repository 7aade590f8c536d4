#!/usr/bin/env bash
# Reproduces the gates shipped in gateskip_core/shipped_gates/ (CPU, 2 cores: see README for timings).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs gateskip_core/shipped_gates
common=(--model smollm2-135m-instruct --steps 400 --seq-len 128 --batch 4 --lr 1e-2 --sparsity-weight 0.1
        --sparsity-loss l2 --skip-start 0 --skip-end 0.25 --skip-ramp-steps 200 --data builtin --seed 0)
gateskip train "${common[@]}" --gate vector --int8 --out runs/smollm2-135m-instruct-vector.safetensors
gateskip train "${common[@]}" --gate scalar --out runs/smollm2-135m-instruct-scalar.safetensors
cp runs/smollm2-135m-instruct-vector.safetensors runs/smollm2-135m-instruct-scalar.safetensors gateskip_core/shipped_gates/
