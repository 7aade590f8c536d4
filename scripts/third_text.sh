#!/usr/bin/env bash
# The third held-out text of the skip-signal work (issue: gates that learn what a skip costs): English
# prose that is not code, not legal and in no training data — Debian's `fortunes` package (quotations
# from literature, people and proverbs), chosen before the ablation and looked at only for the final
# comparison. Writes, for each GATES given (LABEL=GATES), quality at matched 10/20/30% net FLOPs saved
# against both ShortGPT variants: docs/results/third_text_<LABEL>.csv (+ _matched.csv).
#   bash scripts/third_text.sh shipped=default-v2 ranked=default
# TABLE_ONLY=1 prints the Markdown table from the CSVs already written.
set -euo pipefail
cd "$(dirname "$0")/.."
FORTUNES=/usr/share/games/fortunes
if [ ! -f "$FORTUNES/literature" ]; then
    echo "third_text: Debian's fortunes package is missing: apt-get install -y fortunes" >&2
    exit 2
fi
TEXT="${TEXT:-runs/third_text.txt}"
mkdir -p "$(dirname "$TEXT")"
# One paragraph per quotation: the files separate them with lines holding a single '%'.
python3 - "$FORTUNES" "$TEXT" <<'PY'
import pathlib, sys
folder, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
quotes = []
for name in ("literature", "people", "wisdom"):
    for quote in (folder / name).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        lines = [line.strip() for line in quote.strip("%\n").splitlines() if line.strip()]
        if lines:
            quotes.append(" ".join(lines))
out.write_text("\n\n".join(quotes) + "\n")
print(f"{len(quotes)} quotations, {sum(map(len, quotes)):,} characters -> {out}")
PY
for config in "$@"; do
    label="${config%%=*}"; gates="${config#*=}"
    [ "${TABLE_ONLY:-0}" = 1 ] && continue  # only the table below, from the CSVs already written
    gateskip sweep --gates "$gates" --methods gateskip,shortgpt,shortgpt-calibration --budgets 0,0.1,0.2,0.3,0.4,0.5 \
        --blocks 8 --file "$TEXT" \
        --out "docs/results/third_text_$label.csv" --matched-out "docs/results/third_text_${label}_matched.csv"
done
# One Markdown table: perplexity / KL / top-1 at matched 10 / 20 / 30% net saved, per gate set and ShortGPT
# (the renderer of training.md's table, scripts/doc_tables.py third_text).
labels=()
for config in "$@"; do labels+=("${config%%=*}"); done
python3 scripts/doc_tables.py --show "third_text ${labels[*]}"
