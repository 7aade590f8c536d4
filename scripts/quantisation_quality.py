"""Quality of the gates on a weight-quantised backbone (issue 36, points 1-2): fp32 vs int8 vs int4.

For one model and its shipped `default` gates (trained on the float32 backbone), on held-out pydoc
blocks (the validation split, which no gate training or calibration reads):

- `--out` (quality): per weights (fp32, int8, int4) and budget, perplexity, KL and top-1 agreement
  against the *float32* ungated model (so quantisation and skipping are charged together), for
  the gates (quantile policy) and for random skipping at the same budget (mean of `--seeds` draws,
  each row kept). Rows `int4+gates` quantise the gates' own linear layers to int4 too (the
  reference code's setup: it quantises the whole model, gates included); everything else keeps
  gates, adapter and stand-ins float.
- `--shift-out` (how quantisation moves the gates): per (layer, branch), the mean gate on fp32
  and on int4 weights, their mean difference and mean absolute difference over the same tokens,
  and the share of skip decisions that flip between the two at each budget (same blocks, same
  quantile policy; BOS, never eligible, left out).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/quantisation_quality.py \
        --model smollm2-135m-instruct --out docs/results/quantisation_smollm2-135m-instruct.csv \
        --shift-out docs/results/quantisation_gate_shift_smollm2-135m-instruct.csv

Without `--out` only the gate shift runs (fp32 and int4 loaded, no quality rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.experiments.quality import evaluate, evaluation_blocks, reference  # noqa: E402
from gateskip_core import load_model  # noqa: E402
from gateskip_core.backbone.quantisation import quantise_linears  # noqa: E402
from gateskip_core.branches import BRANCHES  # noqa: E402

WEIGHTS = ("fp32", "int8", "int4")


def quality_rows(model, ref, weights: str, budgets, seeds: int, label: str | None = None) -> list[dict]:
    """One row per budget for the gates, and per (budget, seed) for random skipping (none when `seeds` is 0)."""
    rows = []
    for budget in budgets:
        row = evaluate(model, ref, model.make_plan(budget, "quantile"))
        rows.append({"weights": label or weights, "policy": "gates", "seed": "", "skip_budget": budget, **row})
        if budget == 0 or label is not None:
            continue
        for seed in range(seeds):
            row = evaluate(model, ref, model.make_plan(budget, "random", seed=seed))
            rows.append({"weights": weights, "policy": "random", "seed": seed, "skip_budget": budget, **row})
    return rows


def with_int4_gates(model):
    """The same model with its gates' linear layers quantised to int4 (dequantised), a copy."""
    gates = copy.deepcopy(model.gates)
    names = quantise_linears(gates, "int4", exclude=None)
    if not names:
        raise SystemExit("these gates have no linear layers to quantise")
    return model.view(gates, f"{model.gates_label} (int4 gates)", model.checkpoint)


def decisions(model, blocks: torch.Tensor, budget: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gate values and skip decisions [N, T, L, 2] of the quantile policy, and the eligible mask [N, T]."""
    out = model.forward(blocks, torch.ones_like(blocks), model.make_plan(budget, "quantile"), logits_for="last")
    return out.gate.numpy(), out.skipped.numpy(), out.eligible.numpy()


def gate_shift(fp32, int4, blocks, budgets) -> pd.DataFrame:
    """Per (layer, branch): mean gates on both backbones, their shift, and the decisions that flip per budget."""
    gate_a, _, eligible = decisions(fp32, blocks, 0.0)
    gate_b, _, _ = decisions(int4, blocks, 0.0)
    mask = eligible.astype(bool)
    a, b = gate_a[mask], gate_b[mask]  # [tokens, L, 2]
    flips = {}
    for budget in budgets:
        skip_a, skip_b = decisions(fp32, blocks, budget)[1][mask], decisions(int4, blocks, budget)[1][mask]
        flips[budget] = (skip_a != skip_b).mean(axis=0)  # [L, 2]
    rows = []
    for layer in range(a.shape[1]):
        for j, branch in enumerate(BRANCHES):
            row = {
                "layer": layer,
                "branch": branch,
                "gate_fp32": float(a[:, layer, j].mean()),
                "gate_int4": float(b[:, layer, j].mean()),
                "mean_shift": float((b[:, layer, j] - a[:, layer, j]).mean()),
                "mean_abs_shift": float(np.abs(b[:, layer, j] - a[:, layer, j]).mean()),
                "tokens": int(a.shape[0]),
            }
            row.update({f"flipped_at_{budget:g}": float(flips[budget][layer, j]) for budget in budgets})
            rows.append(row)
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--gates", default="default")
    parser.add_argument("--budgets", default="0,0.1,0.2,0.3")
    parser.add_argument("--blocks", type=int, default=8, help="held-out pydoc blocks of 128 tokens")
    parser.add_argument("--seeds", type=int, default=3, help="random-skipping draws per budget")
    parser.add_argument("--random-on", default="fp32,int8,int4", help="the weights that get random-skipping rows")
    parser.add_argument("--no-int4-gates", action="store_true", help="leave out the int4+gates rows (saves time)")
    parser.add_argument("--out", help="the quality CSV; left out when not given (then only --shift-out runs)")
    parser.add_argument("--shift-out", help="the gate-shift CSV; left out when not given (saves time)")
    args = parser.parse_args(argv)
    if args.out is None and args.shift_out is None:
        parser.error("nothing to write: give --out, --shift-out or both")
    return args


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    random_on = set(args.random_on.split(",")) if args.random_on else set()

    # only the gate shift: int8 is not loaded (it compares fp32 with int4)
    needed = WEIGHTS if args.out is not None else ("fp32", "int4")
    models = {w: load_model(args.model, gates=args.gates, weights=w) for w in needed}
    blocks = evaluation_blocks(models["fp32"], n_blocks=args.blocks)
    if args.out is not None:
        ref = reference(models["fp32"], blocks)  # the float32 ungated model: every row compares with it
        rows = []
        for weights, model in models.items():
            print(f"{weights} ...", file=sys.stderr)
            rows += quality_rows(model, ref, weights, budgets, args.seeds if weights in random_on else 0)
        if not args.no_int4_gates:
            rows += quality_rows(with_int4_gates(models["int4"]), ref, "int4", budgets, 0, label="int4+gates")
        table = pd.DataFrame(rows)
        table.insert(0, "model", models["fp32"].name)
        table.to_csv(args.out, index=False, float_format="%.6g")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.shift_out is None:
        return 0
    shift = gate_shift(models["fp32"], models["int4"], blocks, [b for b in budgets if b > 0])
    shift.insert(0, "model", models["fp32"].name)
    shift.to_csv(args.shift_out, index=False, float_format="%.6g")
    print(f"wrote {args.shift_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
