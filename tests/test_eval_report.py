"""Accuracy against net compute from `gateskip eval` tables: the figure, the report's numbers, and the
page (docs/evaluation.md) holding exactly what the shipped tables say."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.evaluation.figures import accuracy_figure, check_eval_table, headline_metric
from analysis.evaluation.report import (
    accuracy_tasks,
    matched_table,
    mean_retained,
    report_markdown,
    retained_curve,
    saving_at_retention,
    targets_markdown,
)
from gateskip_core import GateSkipError

ROOT = Path(__file__).resolve().parent.parent
# the tables docs/evaluation.md prints (Gemma-3's once scripts/eval_gemma3_table.sh has written it)
SHIPPED = {
    name: ROOT / "docs" / "results" / name
    for name in ("eval_smollm2.csv", "eval_gemma3.csv", "eval_smollm2_nextsent.csv")
    if (ROOT / "docs" / "results" / name).exists()
}


def _table(points: dict[str, list[tuple[float, float, float]]], task: str = "t", metric: str = "acc") -> pd.DataFrame:
    """A measured eval table: per method, (budget, net saved, value) points."""
    rows = [
        dict(task=task, metric=metric, value=v, stderr=0.01, method=m, skip_budget=b, net_flops_saved=s, n=10)
        for m, pts in points.items()
        for b, s, v in pts
    ]
    return pd.DataFrame(rows).assign(kind="measured")


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_page_holds_each_shipped_tables_report(name):
    """docs/evaluation.md prints `scripts/eval_report.py`'s Markdown of every shipped table, unchanged."""
    page = (ROOT / "docs" / "evaluation.md").read_text()
    assert report_markdown(pd.read_csv(SHIPPED[name])) in page, f"rerun scripts/eval_report.py for {name}"


def test_figure_has_a_panel_per_task_a_line_per_method_and_matched_markers():
    table = pd.read_csv(SHIPPED["eval_smollm2.csv"])
    fig = accuracy_figure(table)
    tasks = list(dict.fromkeys(table["task"]))
    assert [a.text for a in fig.layout.annotations] == [f"{t} (acc)" for t in tasks]
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == len(tasks) * table["method"].nunique()
    first = lines[0]  # pydoc, gateskip: the measured accuracies in order of net saved
    expected = table[(table.task == tasks[0]) & (table.metric == "acc") & (table.method == "gateskip")]
    expected = expected[expected.kind == "measured"].sort_values("net_flops_saved")
    np.testing.assert_allclose(first.y, expected["value"])
    matched = [t for t in fig.data if t.mode == "markers"]
    assert matched and all(set(np.round(t.x, 3)) <= {0.1, 0.2, 0.3} for t in matched)


def test_headline_metric_and_log_axis_for_perplexity():
    table = pd.concat([_table({"gateskip": [(0, 0, 20.0), (0.3, 0.2, 40.0)]}, "ppl", "word_perplexity")])
    assert headline_metric(table, "ppl") == "word_perplexity"
    assert accuracy_figure(table).layout.yaxis.type == "log"
    with pytest.raises(GateSkipError, match="no column"):
        check_eval_table(table.drop(columns=["net_flops_saved"]))


def test_retained_accuracy_and_the_saving_it_lasts_to():
    """Task a: 1.0 -> 0.9 -> 0.5 of its accuracy at 0/10/20% net; task b keeps all of it: the mean
    is 0.95 at 10%, 0.85 at 15%, and crosses 90% at 12.5% (linear between budgets)."""
    a = _table({"gateskip": [(0, 0.0, 0.4), (0.1, 0.1, 0.36), (0.2, 0.2, 0.2)]}, "a")
    b = _table({"gateskip": [(0, 0.0, 0.5), (0.1, 0.1, 0.5), (0.2, 0.2, 0.5)]}, "b")
    table = pd.concat([a, b])
    saved, retained = retained_curve(table, "a")
    np.testing.assert_allclose(retained, [1.0, 0.9, 0.5])
    assert mean_retained(table, 0.1) == pytest.approx(0.95)
    assert mean_retained(table, 0.15) == pytest.approx((0.7 + 1.0) / 2)
    assert math.isnan(mean_retained(table, 0.25))  # beyond the budgets
    never = _table({"gateskip": [(0, 0.0, 0.0), (0.1, 0.1, 0.0), (0.2, 0.2, 0.0)]}, "c")  # 0 at budget 0
    assert accuracy_tasks(pd.concat([table, never])) == ["a", "b"]  # a share of 0 is undefined: left out
    assert mean_retained(pd.concat([table, never]), 0.1) == pytest.approx(0.95)
    # mean retained: 1 - x/2 up to 10%, then 0.95 - 2 (x - 10%): 0.9 at 12.5%
    assert saving_at_retention(table) == pytest.approx(0.125, abs=1e-3)


def test_the_claims_line_says_what_was_testable_where_it_interpolates_and_when_it_is_noise():
    """Budgets stopping at 10% net: the 15% claim is 'not testable' (with where they stop and what is
    kept there), the 90% crossing (12.5% of a/b's curves cut at 10%: whole range) names its budgets;
    a standard error of 0.10 or more at budget 0 makes the line open with 'Noise on N items'."""
    a = _table({"gateskip": [(0, 0.0, 0.4), (0.1, 0.05, 0.36), (0.2, 0.1, 0.2)]}, "a")
    b = _table({"gateskip": [(0, 0.0, 0.5), (0.1, 0.05, 0.5), (0.2, 0.1, 0.5)]}, "b")
    line = targets_markdown(pd.concat([a, b]))
    assert line.startswith("On 10 items per task: ")
    assert "not testable at 15% net saved (its budgets stop at 10% net; there it keeps 75%" in line
    # mean retained 1 - x up to 5%, then 0.95 - 4 (x - 5%): 0.9 at 6.25%, between budgets 0.1 and 0.2
    assert "up to 6.2% net saved (interpolated between budgets 0.1 and 0.2)" in line
    noisy = pd.concat([a, b]).assign(stderr=0.12)
    assert targets_markdown(noisy).startswith("Noise on 10 items per task (one standard error 0.12-0.12): ")


def test_matched_gap_is_gateskip_minus_the_better_shortgpt_and_flips_for_perplexity():
    def matched(metric, gs, sg, sgc):
        rows = [
            dict(
                task="t",
                metric=metric,
                value=v,
                stderr=math.nan,
                method=m,
                skip_budget=math.nan,
                net_flops_saved=0.1,
                n=10,
                kind="matched",
            )
            for m, v in (("gateskip", gs), ("shortgpt", sg), ("shortgpt-calibration", sgc))
        ]
        return matched_table(pd.DataFrame(rows))["gateskip_ahead_by"].iloc[0]

    assert matched("acc", 0.5, 0.3, 0.4) == pytest.approx(0.1)
    assert matched("acc", 0.2, 0.3, math.nan) == pytest.approx(-0.1)
    assert matched("word_perplexity", 20.0, 30.0, 25.0) == pytest.approx(5.0)
