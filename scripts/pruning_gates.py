"""Pruning plus gates on held-out pydoc and legal text: `shortgpt+gateskip:K` against its parts alone
(ShortGPT with calibration Block Influence, GateSkip) at matched net FLOPs saved.

    python scripts/pruning_gates.py --out docs/results/pruning_gates.csv [--blocks 4] [--ks 3,6,9]

One `gateskip sweep` (analysis.experiments.sweep.sweep) per text, SmolLM2 with its default gates.
Writes every measured row (`pruning_gates.csv`, with a `text` column) and each method's quality at
10 / 20 / 30% net saved, interpolated along its budgets (`pruning_gates_matched.csv`; for
`shortgpt+gateskip:K` also the interpolated budget b of the gated part, `skip_budget`).
The held-out texts tune nothing: the gates trained on the pydoc training split, Block Influence is
measured on the calibration split, and the legal text (Python's LICENSE) is in neither.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.experiments.quality import evaluation_blocks
from analysis.experiments.sweep import at_matched_savings, sweep
from gateskip_core import load_model
from gateskip_core.data import pydoc_texts

BUDGETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
TARGETS = (0.1, 0.2, 0.3)
METRICS = ["ppl", "kl_to_full", "top1_agreement"]


def texts() -> dict[str, list[str]]:
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"  # legal prose: in no training data
    return {"pydoc": pydoc_texts("validation"), "legal": [license_file.read_text()]}


def matched(table: pd.DataFrame) -> pd.DataFrame:
    """`at_matched_savings` plus, per method, the budget b interpolated at each target (the gated part)."""
    out = at_matched_savings(table, TARGETS)
    budgets = []
    for row in out.itertuples():
        part = table[table["method"] == row.method].sort_values("flops_saved")
        inside = part["flops_saved"].min() <= row.net_flops_saved <= part["flops_saved"].max()
        b = np.interp(row.net_flops_saved, part["flops_saved"], part["skip_budget"]) if inside else np.nan
        budgets.append(b)
    return out.assign(skip_budget=budgets)[["method", "net_flops_saved", "skip_budget", *METRICS]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--blocks", type=int, default=4, help="held-out blocks of 128 tokens per text")
    parser.add_argument("--ks", default="3,6,9", help="layers removed by shortgpt+gateskip:K")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = ["gateskip", "shortgpt-calibration"] + [f"shortgpt+gateskip:{k}" for k in args.ks.split(",")]
    model = load_model(args.model, gates="default")
    rows, matches = [], []
    for name, text in texts().items():
        blocks = evaluation_blocks(model, text, n_blocks=args.blocks)
        table = sweep(
            model, BUDGETS, methods, blocks, on_step=lambda d, n, m, t=name: print(f"{t} {d}/{n} {m}", flush=True)
        )
        rows.append(table.assign(text=name))
        matches.append(matched(table).assign(text=name))
    out = Path(args.out)
    pd.concat(rows).to_csv(out, index=False)
    both = pd.concat(matches)
    both = both[["text", *both.columns.drop("text")]]
    both.to_csv(out.with_name(out.stem + "_matched.csv"), index=False)
    print(both.to_string(index=False, float_format=lambda v: f"{v:.4g}"), file=sys.stdout)


if __name__ == "__main__":
    main()
