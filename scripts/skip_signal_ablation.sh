#!/usr/bin/env bash
# The skip-signal ablation in the README (docs/results/skip_signal_*.csv): what tells a gate that a skip hurts.
# Every recipe continues the previous default, default-v2 (low-rank gates + LoRA 16 + rank-16 stand-ins,
# adapter scope 'skipped', global allocation) for the same number of steps, with one lever or all:
#   rule     the current rule (a skipped token's gate gets no task gradient)
#   ste      --skip-gradient straight-through
#   rank     --rank-weight 0.5 (pairwise ranking toward each skip's residual change)
#   router   --router-first STEPS/2 (gates and stand-ins alone first, then the adapter joins)
#   combo    all three
#   rankfo   --rank-weight 0.5 --rank-target first-order (ranking toward each skip's first-order cost)
# Then, for each recipe and the shipped default: quality on held-out pydoc and legal text at budget 0
# and matched 10/20/30% net saved against both ShortGPT variants (scripts/fidelity_ablation.py),
# ranking against exact harm on held-out pydoc (gateskip faithfulness), and chat fidelity.
# STEPS=40 THREADS=1: about an hour on one thread of this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export THREADS="${THREADS:-1}" OMP_NUM_THREADS="${THREADS:-1}"
STEPS="${STEPS:-40}"
RUNS="${RUNS:-runs}"
EXACT="${EXACT:-300}"
DEFAULT=gateskip_core/shipped_gates/smollm2-135m-instruct-default-v2.safetensors  # the default when it ran
mkdir -p "$RUNS" runs docs/results
python3 -c "
import pathlib
from gateskip_core.data import pydoc_texts
pathlib.Path('runs/heldout.txt').write_text('\n\n'.join(pydoc_texts('validation')))"
train() {
    local name="$1"; shift
    [ -f "$RUNS/sig-$name.safetensors" ] && return 0
    STEPS="$STEPS" NAME="sig-$name" INIT="$DEFAULT" RUNS="$RUNS" scripts/train_fidelity.sh --adapter-scope skipped \
        --skip-fill lowrank:16 --seed 3 "$@"
}
train rule
train ste --skip-gradient straight-through
train rank --rank-weight 0.5
train router --router-first $((STEPS / 2))
train combo --skip-gradient straight-through --rank-weight 0.5 --router-first $((STEPS / 2))
train rankfo --rank-weight 0.5 --rank-target first-order
RECIPES=(shipped="$DEFAULT")
for name in rule ste rank router combo rankfo; do RECIPES+=("$name=$RUNS/sig-$name.safetensors"); done
python3 scripts/fidelity_ablation.py --out docs/results/skip_signal_quality.csv "${RECIPES[@]}"
for recipe in "${RECIPES[@]}"; do
    label="${recipe%%=*}"; gates="${recipe#*=}"
    gateskip faithfulness --gates "$gates" --file runs/heldout.txt --max-tokens 128 --exact "$EXACT" \
        --out "$RUNS/faith-$label.csv"
    gateskip chat-fidelity --gates "$gates" --budgets 0,0.25 --policies quantile --out "$RUNS/chat-$label.csv"
done
python3 scripts/skip_signal_table.py "$RUNS" "${RECIPES[@]%%=*}"
for label in "${RECIPES[@]%%=*}"; do  # the per-recipe ranking and chat tables, next to the summary
    cp "$RUNS/faith-$label.csv" "docs/results/skip_signal_faith-$label.csv"
    cp "$RUNS/chat-$label.csv" "docs/results/skip_signal_chat-$label.csv"
done
