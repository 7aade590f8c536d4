"""The paper's gate comparison on held-out text: per-layer vs shared vector gates, and vector vs low-rank vs
scalar gates, trained at equal steps by `scripts/compare_gate_variants.sh`, compared at matched net savings.

Each variant runs the quantile policy at budgets 0 … 0.6 over fixed blocks of two held-out texts (the pydoc
validation split and Python's LICENSE: neither is in training or calibration data). Every block is scored
on its own, so a bootstrap over blocks gives 95% intervals of each variant's quality at 10 / 20 / 30% net
FLOPs saved (gates and stand-ins charged), and of the paired difference between two variants (same blocks
resampled for both). Random skipping at the same budgets is the floor; the shipped `default` gates (a
longer low-rank recipe) on the same blocks give the scale.

    python scripts/gate_variants_report.py [--runs runs/variants] [--blocks 12] [--out docs/results/gate_variants_matched.csv]

Writes, next to the matched table: the per-(variant, text, budget, block) rows
(docs/results/gate_variants_sweep.csv), the paired differences (docs/results/gate_variants_paired.csv),
the paired differences at equal skip budget, the gates' own cost ignored as in the paper
(docs/results/gate_variants_equal_budget.csv), and the cloze tasks' accuracy pooled per variant, method and
budget (docs/results/gate_variants_tasks.csv, from scripts/gate_variants_eval.sh's CSVs in the same folder).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis.experiments.quality import Reference, evaluate, evaluation_blocks, reference
from gateskip_core import load_model
from gateskip_core.data import paragraphs

VARIANTS = ("vector", "vector-shared", "lowrank16", "scalar")
BUDGETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
TARGETS = (0.1, 0.2, 0.3)
METRICS = ("kl_to_full", "top1_agreement", "nll")
SHIPPED = "default (shipped)"
PAIRS = (("vector", "vector-shared"), ("vector", "lowrank16"), ("vector", "scalar"), ("lowrank16", "scalar"))
PAIRS += tuple((v, f"{v} random") for v in VARIANTS) + (("lowrank16", SHIPPED), ("scalar", SHIPPED))


def heldout_texts() -> dict[str, list[str]]:
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    from gateskip_core.data import pydoc_texts

    return {"pydoc": pydoc_texts("validation"), "legal": paragraphs(license_file.read_text())}


def per_block_rows(model, ref: Reference, label: str, text: str, policy: str) -> list[dict]:
    """One row per (budget, block): that block's quality and net FLOPs saved under `label`'s gates."""
    rows = []
    for budget in BUDGETS:
        plan = model.make_plan(budget, policy)
        for i, block_lp in enumerate(ref.log_probs):
            one = Reference(ref.blocks[i : i + 1], [block_lp], 1)
            result = evaluate(model, one, plan)
            rows.append(
                {
                    "variant": label,
                    "text": text,
                    "skip_budget": budget,
                    "block": i,
                    "kl_to_full": result["kl_to_full"],
                    "top1_agreement": result["top1_agreement"],
                    "nll": float(np.log(result["ppl"])),
                    "flops_saved": result["flops_saved"],
                }
            )
    return rows


def matched(curve: pd.DataFrame, target: float, metric: str) -> float:
    """A metric at `target` net saving, interpolated along the budget curve (NaN outside it)."""
    curve = curve.sort_values("flops_saved")
    saved = curve["flops_saved"].to_numpy()
    if not saved.min() <= target <= saved.max():
        return float("nan")
    return float(np.interp(target, saved, curve[metric].to_numpy()))


def bootstrap_matched(table: pd.DataFrame, n_boot: int, seed: int = 0) -> pd.DataFrame:
    """Each variant's quality at each target, and paired differences, with 95% bootstrap-over-blocks intervals."""
    rng = np.random.default_rng(seed)
    rows = []
    for text, part in table.groupby("text", sort=False):
        n_blocks = part["block"].nunique()
        draws = [np.arange(n_blocks)] + [rng.integers(0, n_blocks, n_blocks) for _ in range(n_boot)]
        values: dict[tuple, list[float]] = {}
        curves = {  # variant -> column -> [budget, block] array
            variant: {c: rows_v.pivot(index="skip_budget", columns="block", values=c).to_numpy()
                      for c in (*METRICS, "flops_saved")}
            for variant, rows_v in part.groupby("variant", sort=False)
        }  # fmt: skip
        for idx in draws:
            weights = np.bincount(idx, minlength=n_blocks) / len(idx)
            for variant, arrays in curves.items():
                curve = pd.DataFrame({c: a @ weights for c, a in arrays.items()})
                for target in TARGETS:
                    for metric in METRICS:
                        values.setdefault((variant, target, metric), []).append(matched(curve, target, metric))
        for (variant, target, metric), vals in values.items():
            rows.append(_summary(text, variant, target, metric, vals))
        for a, b in PAIRS:
            for target in TARGETS:
                for metric in METRICS:
                    if (a, target, metric) in values and (b, target, metric) in values:
                        diff = np.subtract(values[(a, target, metric)], values[(b, target, metric)])
                        rows.append(_summary(text, f"{a} - {b}", target, metric, list(diff)))
    return pd.DataFrame(rows)


def _summary(text: str, variant: str, target: float, metric: str, vals: list[float]) -> dict:
    point, boot = vals[0], np.asarray(vals[1:], dtype=float)
    boot = boot[~np.isnan(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return {"text": text, "variant": variant, "net_flops_saved": target, "metric": metric,
            "value": point, "low": float(low), "high": float(high)}  # fmt: skip


def equal_budget(table: pd.DataFrame, n_boot: int, seed: int = 0) -> pd.DataFrame:
    """The paper's framing: the variants at the same skip budget, the gates' own cost ignored. Mean over
    blocks of each pair's difference at each budget, with a 95% bootstrap-over-blocks interval (wide
    layout, as `wide`)."""
    rng = np.random.default_rng(seed)
    rows = []
    pairs = [(a, b) for a, b in PAIRS if not b.endswith("random") and b != SHIPPED]
    for text, part in table.groupby("text", sort=False):
        n_blocks = part["block"].nunique()
        draws = [rng.integers(0, n_blocks, n_blocks) for _ in range(n_boot)]
        for a, b in pairs:
            for budget in (0.1, 0.2, 0.3):
                row = {"text": text, "gates": f"{a} - {b}", "skip_budget": budget}
                for metric in ("kl_to_full", "top1_agreement"):
                    at = part[np.isclose(part["skip_budget"], budget)].pivot(
                        index="block", columns="variant", values=metric
                    )
                    diff = (at[a] - at[b]).to_numpy()
                    boot = [diff[idx].mean() for idx in draws]
                    row[metric] = diff.mean()
                    row[f"{metric}_low"], row[f"{metric}_high"] = np.percentile(boot, [2.5, 97.5])
                rows.append(row)
    return pd.DataFrame(rows)


def wide(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (text, variant or difference, net saving): each metric with its METRIC_low / METRIC_high
    interval beside it (the layout scripts/doc_tables.py's `intervals` renderer shows); rows outside a
    variant's budget curve are dropped."""
    summary = summary.dropna(subset=["value"])
    table = summary.pivot_table(
        index=["text", "variant", "net_flops_saved"], columns="metric", values=["value", "low", "high"], sort=False
    )
    out = pd.DataFrame(index=table.index)
    for metric in METRICS:
        out[metric] = table[("value", metric)]
        out[f"{metric}_low"] = table[("low", metric)]
        out[f"{metric}_high"] = table[("high", metric)]
    out = out.reset_index()
    order = {key: i for i, key in enumerate(dict.fromkeys(zip(summary["text"], summary["variant"])))}
    out["rank"] = [order[key] for key in zip(out["text"], out["variant"])]
    out = out.sort_values(["rank", "net_flops_saved"]).drop(columns="rank")
    return out.rename(columns={"variant": "gates"})


def task_summary(paths: dict[str, Path]) -> pd.DataFrame:
    """Per variant, method and budget: the shipped cloze tasks' items answered correctly, pooled over the
    tasks, with a 95% Wilson interval (scripts/gate_variants_eval.sh's `gateskip eval` CSVs)."""
    from analysis.traces.tracedb import wilson

    rows = []
    for variant, path in paths.items():
        acc = pd.read_csv(path)
        acc = acc[(acc.kind == "measured") & (acc.metric == "acc")].drop_duplicates(["task", "method", "skip_budget"])
        for (method, budget), part in acc.groupby(["method", "skip_budget"], sort=False):
            correct, total = int(round((part.value * part.n).sum())), int(part.n.sum())
            low, high = wilson(correct, total)
            rows.append({"gates": variant, "method": method, "skip_budget": budget,
                         "net_flops_saved": round(float((part.net_flops_saved * part.n).sum() / total), 3),
                         "correct": correct, "n": total, "accuracy": correct / total,
                         "accuracy_low": low, "accuracy_high": high})  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/variants", help="where compare_gate_variants.sh wrote the gates")
    parser.add_argument("--blocks", type=int, default=12, help="held-out blocks of 128 tokens per text")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--out", default="docs/results/gate_variants_matched.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs, out = Path(args.runs), Path(args.out)
    done = [v for v in VARIANTS if (runs / f"{v}.done").exists()]
    if not done:
        raise SystemExit(f"gate_variants_report: no finished variant in {runs} (run scripts/compare_gate_variants.sh)")
    evals = {v: out.with_name(f"gate_variants_eval_{v}.csv") for v in done}
    tasks = task_summary({v: path for v, path in evals.items() if path.exists()}).round(3)
    tasks.to_csv(out.with_name(out.stem.removesuffix("_matched") + "_tasks.csv"), index=False)
    model = load_model("smollm2-135m-instruct", gates="none")
    tables = []
    for text, texts in heldout_texts().items():
        model.remove_gates()
        blocks = evaluation_blocks(model, texts, args.blocks, 128)
        ref = reference(model, blocks, batch_size=1)
        for variant in tqdm(done, desc=f"variants on {text}"):
            # one variant's rows are kept next to its gates, so a rerun after a new variant finishes
            # scores only the new one (each costs minutes of CPU per text)
            cache = runs / f"{variant}.report-{text}-{args.blocks}.csv"
            if not cache.exists():
                model.load_gates(runs / f"{variant}.safetensors")
                rows = per_block_rows(model, ref, variant, text, "quantile")
                # random skipping with the same adapter, stand-ins and compute account: the floor of its ranking
                rows += per_block_rows(model, ref, f"{variant} random", text, "random")
                pd.DataFrame(rows).to_csv(cache, index=False)
            tables.append(pd.read_csv(cache))
        # the shipped default (low-rank gates, a longer recipe: docs/training.md) on the same blocks, for scale
        cache = runs / f"shipped-default.report-{text}-{args.blocks}.csv"
        if not cache.exists():
            model.load_gates("default")
            pd.DataFrame(per_block_rows(model, ref, SHIPPED, text, "quantile")).to_csv(cache, index=False)
        tables.append(pd.read_csv(cache))
    table = pd.concat(tables, ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_name(out.stem.removesuffix("_matched") + "_sweep.csv"), index=False)
    matched_table = wide(bootstrap_matched(table, args.boot)).round(3)
    paired = matched_table["gates"].str.contains(" - ")
    matched_table[~paired].to_csv(out, index=False)
    matched_table[paired].to_csv(out.with_name(out.stem.removesuffix("_matched") + "_paired.csv"), index=False)
    same_budget = equal_budget(table, args.boot).round(3)
    same_budget.to_csv(out.with_name(out.stem.removesuffix("_matched") + "_equal_budget.csv"), index=False)
    print(f"wrote {out} ({', '.join(done)})")


if __name__ == "__main__":
    main()
