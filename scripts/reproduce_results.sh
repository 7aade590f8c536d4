#!/usr/bin/env bash
# Regenerates every figure and table in the README from the shipped gates (CPU, ~30 min on 2 cores).
# Held-out texts: the pydoc validation split (prose like the training data, but other topics) and
# Python's own LICENSE.txt (legal text: a domain in no training data).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/results runs  # data the pages cite; intermediate texts and traces
python3 - <<'PY'
import pathlib, sysconfig
from gateskip_core.data import pydoc_texts
pathlib.Path("runs/heldout.txt").write_text("\n\n".join(pydoc_texts("validation")))
license = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
pathlib.Path("runs/heldout_legal.txt").write_text(license.read_text())
PY
python3 scripts/text_provenance.py --out docs/results/texts.csv  # which Python's texts these figures use
# Quality of the shipped gates (+ adapter) against the original model, untrained gates and random skipping.
gateskip quality --gates default=default scalar=default-scalar untrained=untrained:lowrank:16 \
    --budgets 0,0.1,0.2,0.3,0.4 --blocks 16 --out docs/results/quality.csv
gateskip quality --gates default=default --budgets 0,0.1,0.2,0.3,0.4 --blocks 16 \
    --file runs/heldout_legal.txt --out docs/results/quality_legal.csv
# Sweeps against baselines at matched net FLOPs, on both held-out texts.
gateskip sweep --gates default --budgets 0,0.1,0.2,0.3,0.4,0.5 --blocks 6 --out docs/results/sweep.csv \
    --matched-out docs/results/sweep_matched.csv --figure docs/results/sweep.html
gateskip sweep --gates default --budgets 0,0.1,0.2,0.3,0.4,0.5 --blocks 6 --file runs/heldout_legal.txt \
    --out docs/results/sweep_legal.csv --matched-out docs/results/sweep_legal_matched.csv
python3 scripts/figure_png.py docs/results/sweep.html docs/images/sweep.png
# Information flow over a held-out corpus, and faithfulness.
gateskip collect --gates default --skip 0.25 --file runs/heldout.txt --max-tokens 128 --out runs/heldout_traces.parquet
gateskip stats --trace runs/heldout_traces.parquet --out docs/results/layer_stats.csv --bos-out docs/results/bos.csv \
    --types-out docs/results/token_types.csv --tokens-out docs/results/tokens.csv
gateskip faithfulness --gates default-v2 --file runs/heldout.txt --max-tokens 128 --exact 600 --figure docs/results/faithfulness.html \
    --out docs/results/faithfulness.csv --entries-out docs/results/faithfulness_entries.csv
gateskip faithfulness --gates default --file runs/heldout.txt --max-tokens 128 --exact 600 \
    --out docs/results/faithfulness_default.csv --entries-out docs/results/faithfulness_default_entries.csv
# How wide the faithfulness intervals are with 4-10 entries per (layer, branch)
python3 scripts/faithfulness_interval_width.py docs/results/faithfulness_default_entries.csv --per-cell 4,6,8,10 \
    --out docs/results/faithfulness_interval_width.csv
# Logit lens: had tokens that skip late layers already settled? (shipped default and scalar gates)
gateskip settled --gates default --skip 0.25 --blocks 32 --out docs/results/settled.csv \
    --summary-out docs/results/settled_summary.csv --figure docs/results/settled.html
gateskip settled --gates default-scalar --skip 0.25 --blocks 32 --out docs/results/settled_scalar.csv \
    --summary-out docs/results/settled_scalar_summary.csv
python3 scripts/chat_examples.py --out docs/chat_examples.md
# The shipped default against the previous one and ShortGPT at matched net FLOPs, and chat fidelity.
python3 scripts/fidelity_ablation.py --out docs/results/fidelity_default.csv default=default default-v2=default-v2
gateskip chat-fidelity --gates default --out docs/results/chat_fidelity.csv
gateskip chat-fidelity --gates default-v2 --out docs/results/chat_fidelity_v2.csv
rm runs/heldout_traces.parquet runs/heldout.txt runs/heldout_legal.txt
python3 scripts/results_tables.py > docs/results.md
python3 scripts/doc_tables.py  # the pages' tables from the new files
