"""Confidence intervals for the statistics over traces and experiments (no model, no torch).

- `cluster_bootstrap(clusters, statistic)`: a percentile interval that resamples whole clusters (texts,
  sequences), never the repeated measurements inside one: a text's tokens share its context, so
  counting them as independent draws would make intervals too narrow;
- `mantel_haenszel_risk_ratio(...)`: the ratio of two rates compared *within* strata (layers) and
  combined (Mantel-Haenszel), with the Greenland-Robins (1985) variance of its logarithm. Pooling
  strata first can reverse a comparison when the strata differ in both rate and size (Simpson's
  paradox): a layer where many tokens skip and many had settled pulls the pooled ratio up.

Wilson intervals for a rate of independent trials: `analysis.traces.tracedb.wilson`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


def cluster_bootstrap(
    clusters: Sequence,
    statistic: Callable[[list], float],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """`statistic(clusters)` with the percentile interval of `statistic` over `resamples` draws of as
    many clusters, with replacement (a cluster drawn twice counts twice). NaN draws (a resample where
    the statistic is undefined) are left out; the interval is NaN when fewer than half remain."""
    clusters = list(clusters)
    estimate = float(statistic(clusters))
    if len(clusters) < 2:
        return Interval(estimate, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            float(statistic([clusters[i] for i in rng.integers(0, len(clusters), len(clusters))]))
            for _ in range(resamples)
        ]
    )
    draws = draws[np.isfinite(draws)]
    if len(draws) < resamples / 2:
        return Interval(estimate, float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def mantel_haenszel_risk_ratio(exposed_events, exposed_n, other_events, other_n, z: float = Z95) -> Interval:
    """The common ratio of rates (exposed_events / exposed_n against other_events / other_n) over
    strata given as equal-length arrays, one entry per stratum, with its 95% interval (Greenland-
    Robins variance of the log ratio; trials counted as independent within a stratum). Strata where
    either group is empty carry no information and drop out. NaN where no stratum compares."""
    a, n1, c, n0 = (np.asarray(v, dtype=float) for v in (exposed_events, exposed_n, other_events, other_n))
    keep = (n1 > 0) & (n0 > 0)
    a, n1, c, n0 = a[keep], n1[keep], c[keep], n0[keep]
    total = n1 + n0
    numerator = float(np.sum(a * n0 / total))
    denominator = float(np.sum(c * n1 / total))
    if numerator <= 0 or denominator <= 0:
        ratio = numerator / denominator if denominator > 0 else float("nan")
        return Interval(ratio, float("nan"), float("nan"))
    ratio = numerator / denominator
    variance = float(np.sum((n1 * n0 * (a + c) - a * c * total) / total**2)) / (numerator * denominator)
    half = z * np.sqrt(max(variance, 0.0))
    return Interval(ratio, float(ratio * np.exp(-half)), float(ratio * np.exp(half)))


def pooled_risk_ratio(exposed_events, exposed_n, other_events, other_n) -> float:
    """The crude ratio of rates with every stratum summed first (what pooling layers gives)."""
    a, n1, c, n0 = (float(np.sum(v)) for v in (exposed_events, exposed_n, other_events, other_n))
    if not (n1 and n0 and c):
        return float("nan")
    return (a / n1) / (c / n0)


def cluster_mean_interval(sum_y, sum_n, sum_yy, sum_yn, sum_nn, clusters, z: float = Z95):
    """(low, high) of the ratio mean sum(y) / sum(n) when the observations come in clusters (a text's
    tokens): the linearised cluster-robust variance k/(k-1) * sum_i (y_i - m n_i)^2 / N^2, with y_i and
    n_i the cluster's sum and count. Takes the sums over clusters of y_i, n_i, y_i^2, y_i n_i, n_i^2 and
    the cluster count k (arrays, one entry per statistic), so a database can aggregate them; NaN
    where k < 2 (one text says nothing about another)."""
    y, n, yy, yn, nn, k = (np.asarray(v, dtype=float) for v in (sum_y, sum_n, sum_yy, sum_yn, sum_nn, clusters))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = y / n
        spread = np.maximum(yy - 2 * mean * yn + mean**2 * nn, 0.0)
        half = z * np.sqrt(k / (k - 1) * spread) / n
    half = np.where(k >= 2, half, np.nan)
    return mean - half, mean + half
