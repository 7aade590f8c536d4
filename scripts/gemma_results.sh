#!/usr/bin/env bash
# Gemma-3-270M's README rows from its shipped default gates (CPU, ~35 min on 2 cores):
# quality against untrained gates and random skipping, ShortGPT at matched net FLOPs, the findings
# (BOS, token types, depth, sliding vs global attention layers) and decoding speed at batch 1.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/results runs  # data the pages cite; intermediate texts and traces
M=gemma3-270m
python3 - <<'PY'
import pathlib, sysconfig
from gateskip_core.data import pydoc_texts
pathlib.Path("runs/heldout.txt").write_text("\n\n".join(pydoc_texts("validation")))
license = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
pathlib.Path("runs/heldout_legal.txt").write_text(license.read_text())
PY
gateskip quality --model $M --gates default=default untrained=untrained:lowrank:16 \
    --budgets 0,0.1,0.2,0.3 --blocks 8 --out docs/results/gemma3_quality.csv
gateskip quality --model $M --gates default=default untrained=untrained:lowrank:16 \
    --budgets 0,0.1,0.2,0.3 --blocks 8 --file runs/heldout_legal.txt --out docs/results/gemma3_quality_legal.csv
gateskip sweep --model $M --gates default --budgets 0,0.1,0.2,0.3,0.4 --blocks 4 \
    --methods gateskip,random,shortgpt,shortgpt-calibration --out docs/results/gemma3_sweep.csv \
    --matched-out docs/results/gemma3_sweep_matched.csv
gateskip sweep --model $M --gates default --budgets 0,0.1,0.2,0.3,0.4 --blocks 4 --file runs/heldout_legal.txt \
    --methods gateskip,random,shortgpt,shortgpt-calibration --out docs/results/gemma3_sweep_legal.csv \
    --matched-out docs/results/gemma3_sweep_legal_matched.csv
rm -rf runs/gemma3_traces
gateskip collect --model $M --gates default --skip 0.25 --file runs/heldout.txt --max-tokens 128 --out runs/gemma3_traces
gateskip stats --trace runs/gemma3_traces --out docs/results/gemma3_layer_stats.csv --bos-out docs/results/gemma3_bos.csv \
    --types-out docs/results/gemma3_token_types.csv
python3 - <<'PY'
import pandas as pd
from analysis.traces.flow import by_attention_kind
from gateskip_core import load_model
spec = load_model("gemma3-270m").spec
table = by_attention_kind(pd.read_csv("docs/results/gemma3_layer_stats.csv"), [p.sliding_window is not None for p in spec.layers])
table.to_csv("docs/results/gemma3_attention_kinds.csv", index=False)
print(table.to_string(index=False))
PY
gateskip bench --model $M --gates default --sections decode --decode-batches 1 --decode-skips 0,0.25,0.5 \
    --decode-prompt 128 --new-tokens 64 --out docs/results/gemma3_bench.json
rm -rf runs/gemma3_traces runs/heldout.txt runs/heldout_legal.txt
