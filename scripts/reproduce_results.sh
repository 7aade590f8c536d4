#!/usr/bin/env bash
# Regenerates every figure and table in the README from the shipped gates (CPU, ~15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs
python3 - <<'PY' > docs/heldout.txt
from gateskip_core.data import pydoc_texts
print("\n\n".join(pydoc_texts("validation")))
PY
# Issue 3: quality of trained vs untrained gates vs random skipping on held-out text.
gateskip quality --gates trained=default untrained=untrained --budgets 0,0.1,0.25,0.5 --blocks 16 --out docs/quality.csv
gateskip quality --gates scalar=default-scalar --budgets 0,0.1,0.25,0.5 --blocks 16 --out docs/quality_scalar.csv
# Issue 4: sweep against baselines, information flow over a held-out corpus, faithfulness.
gateskip sweep --gates default --budgets 0,0.1,0.2,0.3,0.4,0.5,0.6 --blocks 8 --out docs/sweep.csv --figure docs/sweep.html
python3 scripts/figure_png.py docs/sweep.html docs/sweep.png
gateskip collect --gates default --skip 0.25 --file docs/heldout.txt --max-tokens 128 --out docs/heldout_traces.parquet
gateskip stats --trace docs/heldout_traces.parquet --out docs/layer_stats.csv --bos-out docs/bos.csv --types-out docs/token_types.csv --tokens-out docs/tokens.csv
gateskip faithfulness --gates default --file docs/heldout.txt --max-tokens 128 --exact 48 --out docs/faithfulness.csv --entries-out docs/faithfulness_entries.csv
rm docs/heldout_traces.parquet docs/heldout.txt
