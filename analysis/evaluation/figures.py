"""Accuracy against net compute from a `gateskip eval` table: one panel per task, a line per method.

The measured budgets are joined by lines (error bars: lm-eval's standard error); the matched rows
(each method's value interpolated at 10/20/30% net FLOPs saved) are open markers on the same axes,
so methods can be read off at equal compute. Each panel shows its task's headline metric
(`headline_metric`); perplexities are drawn on a log axis.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.traces.figures import METHOD_COLOURS
from gateskip_core.errors import GateSkipError

# The metric a task is judged by, in order of preference (lm-eval's names): accuracy for multiple
# choice and cloze, exact match for generation, word perplexity for rolling loglikelihood.
HEADLINE_METRICS = ("acc", "exact_match", "word_perplexity")
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
PANEL_WIDTH, PANEL_HEIGHT = 420, 380


def headline_metric(table: pd.DataFrame, task: str) -> str:
    """The first of HEADLINE_METRICS that `task` has in `table` (else its first metric)."""
    metrics = list(dict.fromkeys(table.loc[table["task"] == task, "metric"]))
    if not metrics:
        raise GateSkipError(f"the eval table has no rows for task {task}")
    return next((m for m in HEADLINE_METRICS if m in metrics), metrics[0])


def check_eval_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table if it has `gateskip eval`'s columns, else a one-line error naming the missing ones."""
    needed = ("task", "metric", "value", "stderr", "method", "skip_budget", "net_flops_saved", "kind")
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise GateSkipError(f"not a gateskip eval table: no column(s) {', '.join(missing)}")
    if table.empty:
        raise GateSkipError("the eval table has no rows")
    return table


def accuracy_figure(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Each task's headline metric against net FLOPs saved, one panel per task, a line per method."""
    table = check_eval_table(table)
    tasks = list(dict.fromkeys(table["task"]))
    metrics = {task: headline_metric(table, task) for task in tasks}
    fig = make_subplots(
        rows=1,
        cols=len(tasks),
        subplot_titles=[f"{task} ({metrics[task]})" for task in tasks],
        horizontal_spacing=0.3 / max(len(tasks), 1),
    )
    for col, task in enumerate(tasks, start=1):
        rows = table[(table["task"] == task) & (table["metric"] == metrics[task])]
        for method, part in rows.groupby("method", sort=False):
            _add_method(fig, part, method, col, show_legend=col == 1)
        fig.update_xaxes(title_text="net FLOPs saved", tickformat=".0%", row=1, col=col)
        fig.update_yaxes(title_text=metrics[task], row=1, col=col)
        if metrics[task] in LOWER_IS_BETTER:
            fig.update_yaxes(type="log", row=1, col=col)
    fig.update_layout(
        title=title or "Task accuracy against net compute (open markers: matched net savings)",
        width=max(PANEL_WIDTH * len(tasks), 700),
        height=PANEL_HEIGHT,
        legend=dict(orientation="h", y=-0.25),
        margin=dict(b=110),
    )
    return fig


def _add_method(fig: go.Figure, part: pd.DataFrame, method: str, col: int, show_legend: bool) -> None:
    colour = METHOD_COLOURS.get(method)
    measured = part[part["kind"] == "measured"].sort_values("net_flops_saved")
    matched = part[(part["kind"] == "matched") & part["value"].notna()]
    errors = [0.0 if math.isnan(e) else e for e in measured["stderr"]]
    fig.add_trace(
        go.Scatter(
            x=measured["net_flops_saved"],
            y=measured["value"],
            error_y=dict(type="data", array=errors, thickness=1),
            mode="lines+markers",
            name=method,
            legendgroup=method,
            showlegend=show_legend,
            line=dict(color=colour, dash="dash" if method == "shortgpt-calibration" else None),  # may overlay shortgpt
            customdata=measured["skip_budget"],
            hovertemplate="budget %{customdata}<br>net saved %{x:.1%}<br>%{y:.4g}<extra>" + method + "</extra>",
        ),
        row=1,
        col=col,
    )
    if len(matched):
        fig.add_trace(
            go.Scatter(
                x=matched["net_flops_saved"],
                y=matched["value"],
                mode="markers",
                name=f"{method} (matched)",
                legendgroup=method,
                showlegend=False,
                marker=dict(color=colour, symbol="circle-open", size=11, line=dict(width=2)),
                hovertemplate="matched at %{x:.0%} net<br>%{y:.4g}<extra>" + method + "</extra>",
            ),
            row=1,
            col=col,
        )
