"""Intervals: Mantel-Haenszel ratios within strata, cluster bootstrap (analysis.traces.intervals)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.experiments.logit_lens import settled_summary
from analysis.traces.intervals import cluster_bootstrap, mantel_haenszel_risk_ratio, pooled_risk_ratio

# Simpson's paradox: in each stratum the skipped tokens settle LESS often than those that ran
# (0.8 vs 0.9, 0.1 vs 0.2), but most skipped tokens sit in the stratum where nearly all settle,
# so the pooled rates say the opposite (81/110 vs 29/110).
SIMPSON = dict(exposed_events=[80, 1], exposed_n=[100, 10], other_events=[9, 20], other_n=[10, 100])


def test_mantel_haenszel_equals_the_hand_computation_and_reverses_the_pooled_ratio():
    mh = mantel_haenszel_risk_ratio(**SIMPSON)
    # by hand: sum(a n0 / N) = (80*10 + 1*100) / 110, sum(c n1 / N) = (9*100 + 20*10) / 110
    assert mh.estimate == pytest.approx(900 / 1100)
    # Greenland-Robins: sum((n1 n0 (a + c) - a c N) / N^2) / (sum(a n0 / N) sum(c n1 / N))
    variance = ((100 * 10 * 89 - 80 * 9 * 110) + (10 * 100 * 21 - 1 * 20 * 110)) / 110**2 / (900 / 110 * 1100 / 110)
    half = 1.959963984540054 * np.sqrt(variance)
    assert (mh.low, mh.high) == pytest.approx((900 / 1100 * np.exp(-half), 900 / 1100 * np.exp(half)))
    assert mh.estimate < 1 < pooled_risk_ratio(**SIMPSON) == pytest.approx((81 / 110) / (29 / 110))


def test_one_stratum_gives_the_crude_ratio_with_katz_interval_and_empty_strata_drop_out():
    mh = mantel_haenszel_risk_ratio([30, 5], [100, 0], [20, 7], [200, 9])  # the second stratum has no exposed
    assert mh.estimate == pytest.approx(0.3 / 0.1)
    se = np.sqrt(1 / 30 - 1 / 100 + 1 / 20 - 1 / 200)  # Katz's log risk ratio
    assert mh.low == pytest.approx(3 * np.exp(-1.959963984540054 * se))
    assert np.isnan(mantel_haenszel_risk_ratio([0], [0], [3], [9]).estimate)


def test_settled_summary_reports_the_within_layer_ratio_and_the_pooled_one_beside_it():
    table = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "branch": ["attn", "mlp", "attn", "mlp"],
            "skipped_n": [0, 0, 1000, 100],  # layer 1: the Simpson table x 10
            "skipped_settled": [0, 0, 800, 10],
            "ran_n": [5, 5, 100, 1000],
            "ran_settled": [1, 1, 90, 200],
        }
    )
    summary = settled_summary(table, from_layer=1).set_index("branch")  # layer 1 only: one stratum each
    assert summary.loc["attn", "ratio"] == pytest.approx(0.8 / 0.9)
    assert summary.loc["both", "ratio"] == pytest.approx(900 / 1100)  # the Simpson table, (layer, branch) strata
    assert summary.loc["both", "pooled_ratio"] == pytest.approx(81 / 29)
    assert summary.loc["both", "ratio_low"] < summary.loc["both", "ratio"] < summary.loc["both", "ratio_high"] < 1


def test_cluster_bootstrap_resamples_whole_clusters():
    # 20 texts, each one value repeated 50 times: the spread is that of 20 draws, not of 1000
    rng = np.random.default_rng(1)
    texts = [[float(v)] * 50 for v in rng.normal(0, 1, 20)]
    mean = cluster_bootstrap(texts, lambda cs: float(np.mean(np.concatenate(cs))), resamples=400)
    assert mean.estimate == pytest.approx(np.mean([t[0] for t in texts]))
    assert mean.low < mean.estimate < mean.high
    assert mean.width > 2 * 1.96 * 0.8 / np.sqrt(20) * 0.6  # near the 20-cluster width (sd ~ 1)
    assert np.isnan(cluster_bootstrap([[1.0]], lambda cs: 1.0).low)  # one cluster: no interval
