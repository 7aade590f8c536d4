"""How wide the faithfulness intervals are for a given number of entries per (layer, branch).

From the entries of one `gateskip faithfulness ... --entries-out E.csv` run, draws K entries of each
(layer, branch) stratum (without replacement, `--draws` times per K) and computes the signal table
with its 95% bootstrap intervals (`analysis.experiments.faithfulness.signal_table`) on each draw;
writes, per K and signal, the mean point estimate, interval ends and interval width of the
within-stratum Spearman, the lowest-quarter harm ratio (vs_random) and the oracle ratio (with all
the file's entries, one table: its own interval).

    python scripts/faithfulness_interval_width.py docs/results/faithfulness_default_entries.csv \
        --per-cell 4,6,8,10 --out docs/results/faithfulness_interval_width.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.experiments.faithfulness import BOOTSTRAPPED, signal_table


def draw_per_cell(entries: pd.DataFrame, per_cell: int, seed: int) -> pd.DataFrame:
    """`per_cell` entries of every (layer, branch), drawn without replacement (all of them: as they are)."""
    if per_cell >= int(entries.groupby(["layer", "branch"]).size().min()):
        return entries
    return entries.groupby(["layer", "branch"], group_keys=False).sample(n=per_cell, random_state=seed)


def widths(entries: pd.DataFrame, per_cells: list[int], draws: int, resamples: int) -> pd.DataFrame:
    rows = []
    most = int(entries.groupby(["layer", "branch"]).size().min())
    for per_cell in per_cells:
        tables = [
            signal_table(draw_per_cell(entries, per_cell, seed), resamples=resamples, seed=seed)
            for seed in range(draws if per_cell < most else 1)  # all entries: one draw is all there is
        ]
        for signal in tables[0]["signal"]:
            row = {"per_cell": per_cell, "draws": len(tables), "signal": signal}
            got = [t.set_index("signal").loc[signal] for t in tables]
            for column in BOOTSTRAPPED:  # means over the draws (with all entries: the one table's values)
                for part in ("", "_low", "_high"):
                    row[column + part] = float(np.mean([g[column + part] for g in got]))
                row[f"{column}_width"] = float(np.mean([g[f"{column}_high"] - g[f"{column}_low"] for g in got]))
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", help="an --entries-out CSV of `gateskip faithfulness`")
    parser.add_argument("--per-cell", default="4,6,8,10", help="comma-separated entries per (layer, branch)")
    parser.add_argument("--draws", type=int, default=5, help="subsamples per K (below the file's own K)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    entries = pd.read_csv(args.entries, keep_default_na=False, na_values=[""])
    table = widths(entries, [int(k) for k in args.per_cell.split(",")], args.draws, args.resamples)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    gate = table[table["signal"] == "gate"]
    print(
        gate[["per_cell", "draws", *(f"{c}_width" for c in BOOTSTRAPPED)]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
