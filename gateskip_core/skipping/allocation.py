"""Budgets across layers: one compute budget spent unevenly over (layer, branch).

The paper's rule skips the same fraction in every layer and branch, which skips
exactly where a small model is most sensitive (layer 0, the attention sinks).
The global allocation uses a sensitivity profile measured once, how much the model's output
changes when each branch is skipped for every token (`training/sensitivity.py`, which runs the
model; this module does not), and spends a budget where skipping is cheap in loss and dear in
FLOPs (`allocate_budget`).
Layer removal (ShortGPT) is the special case of rates 1 in a few layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gateskip_core.branches import BRANCHES
from gateskip_core.errors import GateSkipError
from gateskip_core.skipping.policies import parse_branches

ALLOCATIONS = ("uniform", "global")
MAX_ALLOCATED_RATE = 0.95


def allocate_budget(
    total: float,
    sensitivity: np.ndarray,
    saving_flops: np.ndarray,
    branches: str | Sequence[str] = BRANCHES,
    max_rate: float = MAX_ALLOCATED_RATE,
) -> np.ndarray:
    """Spend one global budget unevenly across (layer, branch): a [n_layers, 2] table of skip rates.

    `total` is a fraction of compute: the rates r satisfy sum(c * r) = total * sum(c)
    over the allowed branches, where c is `saving_flops` (what one skipped token
    saves there), so a uniform table r = total meets it too. Each branch is
    modelled as costing `sensitivity * r^2` (`sensitivity`: the loss increase when
    the branch is skipped for every token); minimising the summed cost under the
    compute constraint gives r = clip(lambda * c / sensitivity, 0, max_rate), with
    lambda found by bisection. Insensitive, expensive branches skip most.
    """
    allowed = parse_branches(branches)
    mask = np.zeros(sensitivity.shape, dtype=bool)
    for name in allowed:
        mask[:, BRANCHES.index(name)] = True
    if not 0 <= total <= 1:
        raise GateSkipError(f"skip budget must lie in [0, 1], got {total!r}")
    c = np.where(mask, saving_flops, 0.0)
    target = total * c.sum()
    if total == 0:
        return np.zeros(sensitivity.shape)
    if target >= max_rate * c.sum():
        return np.where(mask, max_rate, 0.0)
    ratio = c / np.maximum(sensitivity, 1e-8)

    def rates(lam: float) -> np.ndarray:
        return np.clip(lam * ratio, 0.0, max_rate)

    low, high = 0.0, 1.0
    while (c * rates(high)).sum() < target:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if (c * rates(mid)).sum() < target else (low, mid)
    return rates(high)
