#!/usr/bin/env bash
# The gate variants of scripts/compare_gate_variants.sh on the shipped cloze tasks (held-out pydoc and legal
# text, --limit 60: 60 pydoc items, all 43 legal ones), quantile policy at budgets 0-0.4 against random
# skipping with the same adapter and stand-ins; one CSV per finished variant under docs/results/ (skipped
# when it exists). ~10 min per variant on one thread. The matched-net comparison:
# python scripts/gate_variants_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
RUNS="${RUNS:-runs/variants}"
GATESKIP="${GATESKIP:-.venv/bin/gateskip}"
for variant in vector vector-shared lowrank16 scalar; do
  out="docs/results/gate_variants_eval_$variant.csv"
  [ -f "$RUNS/$variant.done" ] && [ ! -f "$out" ] || continue
  $GATESKIP eval --model smollm2-135m-instruct --gates "$RUNS/$variant.safetensors" \
      --tasks gateskip_pydoc_lastword,gateskip_legal_lastword --limit 60 --budgets 0,0.1,0.2,0.3,0.4 \
      --methods gateskip,random --policy quantile --batch-size 8 --out "$out"
done
