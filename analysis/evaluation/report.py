"""What a `gateskip eval` table says, as docs/evaluation.md prints it: per-task budget tables, the
methods at matched net savings, and issue 35's targets (retained accuracy, GateSkip against ShortGPT).

Every function reads the CSV's rows only, so the page's numbers are regenerated from the shipped
CSVs by `scripts/eval_report.py` (and tests/test_eval_report.py checks the page holds them).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .figures import LOWER_IS_BETTER, check_eval_table, headline_metric

SHORTGPT = ("shortgpt", "shortgpt-calibration")
RETAINED_LEVEL = 0.9  # the paper's claim: at least 90% of the original's accuracy ...
CLAIMED_SAVING = 0.15  # ... at 15% net compute saved


def _value(value: float, metric: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.4g}" if metric in LOWER_IS_BETTER else f"{value:.2f}"


def _headline_rows(table: pd.DataFrame, task: str, kind: str) -> tuple[str, pd.DataFrame]:
    metric = headline_metric(table, task)
    rows = table[(table["task"] == task) & (table["metric"] == metric) & (table["kind"] == kind)]
    return metric, rows


def budget_table(table: pd.DataFrame, task: str) -> str:
    """The task's headline metric per method and budget: 'value ± stderr, net saved' (Markdown)."""
    metric, rows = _headline_rows(check_eval_table(table), task, "measured")
    budgets = sorted(rows["skip_budget"].unique())
    n = int(rows["n"].iloc[0])
    lines = [
        f"**`{task}`** ({metric}, n = {n}; each cell: {metric} ± lm-eval's standard error, net FLOPs saved)",
        "",
        "| Method | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for method, part in rows.groupby("method", sort=False):
        cells = []
        for budget in budgets:
            row = part[part["skip_budget"] == budget].iloc[0]
            spread = _value(row["stderr"], metric)
            cells.append(f"{_value(row['value'], metric)} ± {spread}, {row['net_flops_saved']:.1%}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every task's headline metric per method at each matched net saving (NaN: beyond its budgets),
    and by how much GateSkip is ahead of the better ShortGPT variant there (positive: ahead; for a
    perplexity, lower is ahead)."""
    table = check_eval_table(table)
    out = []
    for task in dict.fromkeys(table["task"]):
        metric, rows = _headline_rows(table, task, "matched")
        for net, part in rows.groupby("net_flops_saved"):
            values = dict(zip(part["method"], part["value"]))
            shortgpt = [values[m] for m in SHORTGPT if m in values and not math.isnan(values[m])]
            sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
            best = (min if sign < 0 else max)(shortgpt) if shortgpt else math.nan
            gap = sign * (values.get("gateskip", math.nan) - best)
            out.append({"task": task, "metric": metric, "net_flops_saved": net, **values, "gateskip_ahead_by": gap})
    return pd.DataFrame(out)


def matched_markdown(table: pd.DataFrame) -> str:
    """`matched_table` as Markdown: one row per (task, matched net saving)."""
    matched = matched_table(table)
    methods = [m for m in ("gateskip", "random", *SHORTGPT) if m in matched.columns]
    lines = [
        "| Task | Metric | Net saved | " + " | ".join(methods) + " | GateSkip ahead of best ShortGPT by |",
        "|---" * (len(methods) + 4) + "|",
    ]
    for row in matched.to_dict("records"):
        cells = [_value(row[m], row["metric"]) for m in methods]
        gap = row["gateskip_ahead_by"]
        if all(math.isnan(row[m]) for m in methods):
            continue  # no method's budgets reach this saving
        gap_text = "n/a" if math.isnan(gap) else f"{gap:+.4g}" if row["metric"] in LOWER_IS_BETTER else f"{gap:+.2f}"
        lines.append(
            f"| `{row['task']}` | {row['metric']} | {row['net_flops_saved']:.0%} | "
            + " | ".join(cells)
            + f" | {gap_text} |"
        )
    return "\n".join(lines)


def retained_curve(table: pd.DataFrame, task: str, method: str = "gateskip") -> tuple[np.ndarray, np.ndarray]:
    """(net saved, headline value / its value at budget 0) along `method`'s measured budgets, by net saved."""
    metric, rows = _headline_rows(check_eval_table(table), task, "measured")
    rows = rows[rows["method"] == method].sort_values("net_flops_saved")
    original = rows.loc[rows["skip_budget"] == 0, "value"]
    if metric in LOWER_IS_BETTER or original.empty or original.iloc[0] <= 0:
        return np.array([]), np.array([])
    return rows["net_flops_saved"].to_numpy(), rows["value"].to_numpy() / original.iloc[0]


def accuracy_tasks(table: pd.DataFrame) -> list[str]:
    """Tasks whose headline metric is an accuracy (higher is better) above 0 at budget 0: the ones the
    targets average (a share of an accuracy of 0 is undefined)."""
    table = check_eval_table(table)
    return [t for t in dict.fromkeys(table["task"]) if len(retained_curve(table, t)[0])]


def mean_retained(table: pd.DataFrame, net: float) -> float:
    """GateSkip's retained accuracy at `net` saved, averaged over the accuracy tasks (interpolated
    between its budgets; NaN where a task's budgets do not reach `net`)."""
    values = []
    for task in accuracy_tasks(table):
        saved, retained = retained_curve(table, task)
        inside = len(saved) > 1 and saved.min() <= net <= saved.max()
        values.append(float(np.interp(net, saved, retained)) if inside else math.nan)
    return float(np.mean(values)) if values else math.nan


def saving_at_retention(table: pd.DataFrame, level: float = RETAINED_LEVEL, steps: int = 1000) -> float:
    """The largest net saving up to which GateSkip's accuracy, averaged over the accuracy tasks, stays
    at or above `level` of the original's (the first crossing, on a grid within every task's budgets)."""
    curves = [retained_curve(table, task) for task in accuracy_tasks(table)]
    curves = [c for c in curves if len(c[0]) > 1]
    if not curves:
        return math.nan
    low, high = max(c[0].min() for c in curves), min(c[0].max() for c in curves)
    grid = np.linspace(max(low, 0.0), high, steps + 1)
    mean = np.mean([np.interp(grid, saved, retained) for saved, retained in curves], axis=0)
    below = np.flatnonzero(mean < level)
    if below.size == 0:
        return float(grid[-1])  # above the level over the whole range measured
    return float(grid[below[0] - 1]) if below[0] > 0 else math.nan


NOISE_STDERR = 0.10  # one standard error this large at budget 0: a share of the original is noise


def _sample_text(table: pd.DataFrame, tasks: list[str]) -> str:
    """The items per task and, where the original's standard error reaches NOISE_STDERR, a warning."""
    originals = []
    for task in tasks:
        _, rows = _headline_rows(table, task, "measured")
        originals.append(rows[(rows["method"] == "gateskip") & (rows["skip_budget"] == 0)].iloc[0])
    items = sorted({int(row["n"]) for row in originals})
    items_text = str(items[0]) if len(items) == 1 else f"{items[0]}-{items[-1]}"
    errors = [float(row["stderr"]) for row in originals]
    if max(errors) >= NOISE_STDERR:
        return f"Noise on {items_text} items per task (one standard error {min(errors):.2f}-{max(errors):.2f}): "
    return f"On {items_text} items per task: "


def _kept_budgets(table: pd.DataFrame, tasks: list[str], kept_to: float) -> str:
    """Which of GateSkip's measured budgets (the first task's) the 90% crossing lies between."""
    _, rows = _headline_rows(table, tasks[0], "measured")
    rows = rows[rows["method"] == "gateskip"].sort_values("net_flops_saved")
    below = rows.loc[rows["net_flops_saved"] <= kept_to + 1e-9, "skip_budget"]
    above = rows.loc[rows["net_flops_saved"] > kept_to + 1e-9, "skip_budget"]
    if above.empty:
        return f"up to {kept_to:.1%} net saved, its largest budget"
    return f"up to {kept_to:.1%} net saved (interpolated between budgets {below.iloc[-1]:g} and {above.iloc[0]:g})"


def targets_markdown(table: pd.DataFrame) -> str:
    """The paper's claim on this table, in one line: GateSkip's accuracy averaged over the accuracy
    tasks, as a share of the original's, at 15% net saved, and the net saving it keeps 90% up to."""
    table = check_eval_table(table)
    tasks = accuracy_tasks(table)
    if not tasks:
        return "GateSkip averaged over 0 accuracy task(s): nothing to average."
    at_claim, kept_to = mean_retained(table, CLAIMED_SAVING), saving_at_retention(table)
    if math.isnan(at_claim):  # its budgets stop short of the claimed saving: not testable, say where they stop
        reach = min(retained_curve(table, task)[0].max() for task in tasks)
        at_claim_text = (
            f"not testable at {CLAIMED_SAVING:.0%} net saved (its budgets stop at {reach:.0%} net; there it keeps "
            f"{mean_retained(table, reach):.0%} of the original's accuracy)"
        )
    else:
        at_claim_text = f"{at_claim:.0%} of the original's accuracy at {CLAIMED_SAVING:.0%} net saved"
    kept_text = "not even at its lowest budget" if math.isnan(kept_to) else _kept_budgets(table, tasks, kept_to)
    return (
        f"{_sample_text(table, tasks)}GateSkip averaged over {len(tasks)} accuracy task(s): {at_claim_text}; "
        f"at least {RETAINED_LEVEL:.0%} of it {kept_text}."
    )


def report_markdown(table: pd.DataFrame) -> str:
    """Everything docs/evaluation.md shows for one eval table, in order."""
    table = check_eval_table(table)
    parts = [budget_table(table, task) for task in dict.fromkeys(table["task"])]
    parts += ["At matched net savings (interpolated between budgets):", matched_markdown(table)]
    parts.append(targets_markdown(table))
    return "\n\n".join(parts)
