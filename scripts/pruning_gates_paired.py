"""Pruning plus gates against each part alone at ~30% net FLOPs saved, block by block, with intervals.

    python scripts/pruning_gates_paired.py --out docs/results/pruning_gates_paired.csv [--blocks 10]

`scripts/pruning_gates.py` reads each method off its curve at 30% net saved (interpolated, no interval).
This runs each method once at a setting that lands at ~30% on the sweep's account, over more blocks of
the same held-out texts, scores every block on its own, and bootstraps the blocks (paired: the same
resampled blocks for every method) for 95% intervals of each method's perplexity and of its perplexity
ratio, KL difference and top-1 difference against GateSkip alone. Settings (from
docs/results/pruning_gates_matched.csv and docs/results/pruning_gates.csv):
- `gateskip` at the budget the sweep interpolated for 30% on that text;
- `shortgpt+gateskip:K` (pydoc: K=3, legal: K=6, the lowest perplexity at 30% there) at its budget for 30%;
- `shortgpt-calibration` with 12 layers removed (29.8% saved; whole layers do not land on 30%).
Each row gives the net saving the method reached on these blocks.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.experiments.pruning import lowest_influence, pruned_plan
from analysis.experiments.quality import Reference, evaluate, evaluation_blocks, reference
from analysis.experiments.sweep import LayerDropPolicy, block_influence
from gateskip_core import SkipBudget, SkipPlan, load_model
from gateskip_core.data import pydoc_texts

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # text: (gateskip budget, K, mix budget), read off docs/results/pruning_gates_matched.csv at 30%
    "pydoc": (0.4475, 3, 0.385),
    "legal": (0.4479, 6, 0.3087),
}
SHORTGPT_LAYERS = 12
RESAMPLES = 2000


def _texts() -> dict[str, list[str]]:
    spec = importlib.util.spec_from_file_location("pruning_gates", ROOT / "scripts" / "pruning_gates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.texts()


def per_block(model, ref: Reference, plan, evaluated=None) -> pd.DataFrame:
    """One row per block: nll, KL, top-1 agreement and net FLOPs saved of `plan` on that block alone."""
    rows = []
    for i, log_probs in enumerate(ref.log_probs):
        one = Reference(ref.blocks[i : i + 1], [log_probs], 1)
        result = evaluate(evaluated or model, one, plan)
        rows.append({"block": i, "nll": float(np.log(result["ppl"])), **result})
    return pd.DataFrame(rows)


def summary(text: str, blocks: dict[str, pd.DataFrame], seed: int = 0) -> list[dict]:
    """Per method: pooled quality, its 95% interval, and the paired comparison with GateSkip alone."""
    rng = np.random.default_rng(seed)
    n = len(blocks["gateskip"])
    draws = rng.integers(0, n, size=(RESAMPLES, n))
    base = blocks["gateskip"]
    rows = []
    for method, part in blocks.items():
        ppl = np.exp(part["nll"].to_numpy()[draws].mean(1))
        ratio = np.exp((part["nll"].to_numpy() - base["nll"].to_numpy())[draws].mean(1))
        kl = (part["kl_to_full"].to_numpy() - base["kl_to_full"].to_numpy())[draws].mean(1)
        top1 = (part["top1_agreement"].to_numpy() - base["top1_agreement"].to_numpy())[draws].mean(1)
        rows.append(
            {
                "text": text,
                "method": method,
                "setting": part.attrs["setting"],
                "blocks": n,
                "net_flops_saved": part["flops_saved"].mean(),
                "ppl": float(np.exp(part["nll"].mean())),
                "ppl_low": np.percentile(ppl, 2.5),
                "ppl_high": np.percentile(ppl, 97.5),
                "ppl_ratio_vs_gateskip": float(np.exp((part["nll"] - base["nll"]).mean())),
                "ratio_low": np.percentile(ratio, 2.5),
                "ratio_high": np.percentile(ratio, 97.5),
                "kl_diff_vs_gateskip": float((part["kl_to_full"] - base["kl_to_full"]).mean()),
                "kl_diff_low": np.percentile(kl, 2.5),
                "kl_diff_high": np.percentile(kl, 97.5),
                "top1_diff_vs_gateskip": float((part["top1_agreement"] - base["top1_agreement"]).mean()),
                "top1_diff_low": np.percentile(top1, 2.5),
                "top1_diff_high": np.percentile(top1, 97.5),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--blocks", type=int, default=8, help="held-out blocks of 128 tokens per text")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("smollm2-135m-instruct", gates="default")
    calibration = evaluation_blocks(model, pydoc_texts("calibration"), 8, 128)
    influence = block_influence(model, calibration)  # what shortgpt-calibration and the mixes remove by
    rows = []
    for text, (gs_budget, k, mix_budget) in SETTINGS.items():
        blocks = evaluation_blocks(model, _texts()[text], n_blocks=args.blocks)
        ref = reference(model, blocks, batch_size=1)
        removed = lowest_influence(influence, k)
        pruned = lowest_influence(influence, SHORTGPT_LAYERS)
        drop = SkipPlan(
            SkipBudget.make(1.0, model.spec.n_layers), LayerDropPolicy(frozenset(pruned)), protect_bos=False
        )
        results = {
            "gateskip": (per_block(model, ref, model.make_plan(gs_budget)), f"quantile b={gs_budget:g}"),
            f"shortgpt+gateskip:{k}": (
                per_block(model, ref, pruned_plan(model, removed, mix_budget)),
                f"removed layers {','.join(map(str, removed))} + quantile b={mix_budget:g}",
            ),
            "shortgpt-calibration": (
                per_block(model, ref, drop, evaluated=model.view()),
                f"removed layers {','.join(map(str, pruned))}",
            ),
        }
        for table, setting in results.values():
            table.attrs["setting"] = setting
        rows += summary(text, {method: table for method, (table, _) in results.items()})
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
