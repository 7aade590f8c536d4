"""Pruning plus gates, chosen on tuning blocks and reported on blocks that chose nothing.

    python scripts/pruning_gates_untouched.py --out docs/results/pruning_gates_untouched.csv [--blocks 8]

The choice. `scripts/pruning_gates.py` swept K = 3, 6, 9 and budgets 0-0.5 over the first 4 blocks of
128 tokens of each held-out text (pydoc validation split, Python's LICENSE):
`docs/results/pruning_gates_matched.csv`. On those tuning blocks, per text and per target (20%, 30% net
FLOPs saved), the mix `shortgpt+gateskip:K` with the lowest interpolated perplexity is that text's
choice, with its interpolated budget b. Nothing below changes the choice.

The report. Every choice runs on the next `--blocks` blocks of *both* texts (blocks 5, 6, ... of each:
no choice saw them; for the other text, not even the text), against each part alone at the same
target: GateSkip at the budget its tuning curve gives for the target on that text, and ShortGPT
(calibration Block Influence) with the whole-layer count whose net saving is nearest the target.
Each block is scored on its own; 95% bootstrap intervals over the blocks, paired (the same resampled
blocks for every method) for the mix's perplexity ratio, KL difference and top-1 difference against
each part. Blocks are consecutive pieces of one document, so the intervals treat dependent blocks as
independent draws: they are narrower than intervals over texts would be.
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
from gateskip_core import GatedModel, SkipBudget, SkipPlan, account_sequence, load_model
from gateskip_core.data import pydoc_texts

ROOT = Path(__file__).resolve().parent.parent
TUNING = ROOT / "docs" / "results" / "pruning_gates_matched.csv"
TUNING_BLOCKS = 4  # the blocks of each text that pruning_gates.py swept (its --blocks 4)
TARGETS = (0.2, 0.3)
RESAMPLES = 2000
MIX = "shortgpt+gateskip"


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def choices(tuning: pd.DataFrame) -> pd.DataFrame:
    """Per (text, target): the mix of lowest perplexity on that text's tuning blocks, its K and b."""
    mixes = tuning[tuning["method"].str.startswith(MIX) & tuning["ppl"].notna()]
    rows = []
    for (text, target), part in mixes.groupby(["text", "net_flops_saved"], sort=False):
        if round(target, 6) not in TARGETS:
            continue
        best = part.loc[part["ppl"].idxmin()]
        rows.append(
            {"chosen_on": text, "target": target, "k": int(best["method"].split(":")[1]), "b": best["skip_budget"]}
        )
    return pd.DataFrame(rows)


def gateskip_budget(tuning: pd.DataFrame, text: str, target: float) -> float:
    """GateSkip's budget at `target` net saved, interpolated on `text`'s tuning blocks."""
    row = tuning[
        (tuning["text"] == text) & (tuning["method"] == "gateskip") & np.isclose(tuning["net_flops_saved"], target)
    ]
    return float(row["skip_budget"].iloc[0])


def shortgpt_layers_nearest(model: GatedModel, influence: np.ndarray, target: float, seq_len: int) -> list[int]:
    """The lowest-influence layers, as many as put the net saving nearest `target` (whole layers rarely
    land on it exactly)."""
    best, best_gap = [], 1.0
    for n in range(model.spec.n_layers):
        layers = lowest_influence(influence, n)
        skipped = np.zeros((seq_len, model.spec.n_layers, 2), bool)
        skipped[:, layers, :] = True
        acc = account_sequence(model.spec, skipped, (0, 0), seq_len, "physical")
        gap = abs(1 - acc.skipping_flops / acc.dense_flops - target)
        if gap < best_gap:
            best, best_gap = layers, gap
    return best


def per_block(model: GatedModel, ref: Reference, plan: SkipPlan) -> pd.DataFrame:
    """One row per block: nll, KL, top-1 agreement and net FLOPs saved of `plan` on that block alone."""
    rows = []
    for i, log_probs in enumerate(ref.log_probs):
        result = evaluate(model, Reference(ref.blocks[i : i + 1], [log_probs], 1), plan)
        rows.append({"nll": float(np.log(result["ppl"])), **result})
    return pd.DataFrame(rows)


def settings(model, tuning, picks, influence, text: str, target: float, seq_len: int) -> dict:
    """method -> (evaluated model, plan, setting, chosen_on) at one target on one text."""
    b = gateskip_budget(tuning, text, target)
    layers = shortgpt_layers_nearest(model, influence, target, seq_len)
    drop = SkipPlan(SkipBudget.make(1.0, model.spec.n_layers), LayerDropPolicy(frozenset(layers)), protect_bos=False)
    out = {
        "gateskip": (model, model.make_plan(b), f"quantile b={b:.4g}", ""),
        "shortgpt-calibration": (model.view(), drop, "removed layers " + ",".join(map(str, layers)), ""),
    }
    here = picks[np.isclose(picks["target"], target)]
    for k, part in here.groupby("k", sort=False):  # one run per K: texts that chose the same K share it
        mix_b = float(part["b"].iloc[0])
        removed = lowest_influence(influence, k)
        setting = f"removed layers {','.join(map(str, removed))} + quantile b={mix_b:.4g}"
        out[f"{MIX}:{k}"] = (model, pruned_plan(model, removed, mix_b), setting, ",".join(part["chosen_on"]))
    return out


def paired(part: pd.DataFrame, base: pd.DataFrame, draws: np.ndarray, name: str) -> dict:
    """Perplexity ratio, KL and top-1 differences of `part` against `base`, each with a paired 95% interval."""
    row = {}
    for column, values in (
        (f"ppl_ratio_vs_{name}", part["nll"].to_numpy() - base["nll"].to_numpy()),
        (f"kl_diff_vs_{name}", part["kl_to_full"].to_numpy() - base["kl_to_full"].to_numpy()),
        (f"top1_diff_vs_{name}", part["top1_agreement"].to_numpy() - base["top1_agreement"].to_numpy()),
    ):
        boot = values[draws].mean(1)
        ratio = column.startswith("ppl_ratio")
        row[column] = float(np.exp(values.mean()) if ratio else values.mean())
        low, high = np.percentile(boot, [2.5, 97.5])
        row[f"{column}_low"], row[f"{column}_high"] = (np.exp(low), np.exp(high)) if ratio else (low, high)
    return row


def summarise(text: str, target: float, results: dict, seed: int = 0) -> list[dict]:
    """One row per method: its pooled quality with an interval, and the paired comparisons with both parts."""
    n = len(results["gateskip"][0])
    draws = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    rows = []
    for method, (table, setting, chosen_on) in results.items():
        ppl = np.exp(table["nll"].to_numpy()[draws].mean(1))
        row = {
            "text": text,
            "target": target,
            "method": method,
            "chosen_on": chosen_on,
            "setting": setting,
            "blocks": n,
            "net_flops_saved": table["flops_saved"].mean(),
            "ppl": float(np.exp(table["nll"].mean())),
            "ppl_low": np.percentile(ppl, 2.5),
            "ppl_high": np.percentile(ppl, 97.5),
            "kl_to_full": table["kl_to_full"].mean(),
            "top1_agreement": table["top1_agreement"].mean(),
        }
        for part in ("gateskip", "shortgpt-calibration"):
            row.update(paired(table, results[part][0], draws, part.split("-")[0]))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--blocks", type=int, default=8, help="untouched blocks of 128 tokens per text")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tuning = pd.read_csv(TUNING)
    picks = choices(tuning)
    print(picks.to_string(index=False), flush=True)
    model = load_model("smollm2-135m-instruct", gates="default")
    influence = block_influence(model, evaluation_blocks(model, pydoc_texts("calibration"), 8, 128))
    rows = []
    for text, source in _sibling("pruning_gates").texts().items():
        blocks = evaluation_blocks(model, source, n_blocks=TUNING_BLOCKS + args.blocks)[TUNING_BLOCKS:]
        ref = reference(model, blocks, batch_size=1)
        for target in TARGETS:
            runs = settings(model, tuning, picks, influence, text, target, blocks.shape[1])
            results = {m: (per_block(evaluated, ref, plan), s, c) for m, (evaluated, plan, s, c) in runs.items()}
            rows += summarise(text, target, results)
            print(pd.DataFrame(rows).iloc[-len(results) :, :12].to_string(index=False), flush=True)
            pd.DataFrame(rows).to_csv(args.out, index=False, float_format="%.6g")  # each part as it is done


if __name__ == "__main__":
    main()
