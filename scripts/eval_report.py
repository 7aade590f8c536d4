"""docs/evaluation.md's results from the shipped eval tables: the Markdown it prints and the figures.

    python scripts/eval_report.py docs/results/eval_smollm2.csv docs/results/eval_gemma3.csv

For each table: prints its Markdown (budget tables, matched net savings, the paper's claim; the page
holds it verbatim, checked by tests/test_eval_report.py) and writes its figure of accuracy against net
compute to docs/images/<table name>.png (kaleido with the system's Chromium, as the notebooks' PNGs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.evaluation.figures import accuracy_figure  # noqa: E402
from analysis.evaluation.report import report_markdown  # noqa: E402
from analysis.traces.display import figure_png  # noqa: E402

TITLES = {"eval_smollm2": "SmolLM2-135M-Instruct", "eval_gemma3": "Gemma-3-270M"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="gateskip eval CSVs")
    parser.add_argument("--png-dir", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args(argv)
    for path in map(Path, args.tables):
        table = pd.read_csv(path)
        print(f"<!-- {path.name} -->\n\n{report_markdown(table)}\n")
        model = TITLES.get(path.stem, path.stem)
        png = figure_png(accuracy_figure(table, title=f"{model}: task accuracy against net compute (shipped gates)"))
        if png is None:
            print(f"no PNG for {path.name}: kaleido or Chromium missing", file=sys.stderr)
            continue
        out = Path(args.png_dir) / f"{path.stem}.png"
        out.write_bytes(png)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
