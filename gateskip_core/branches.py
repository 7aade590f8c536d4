"""The two gated branches of every layer, what a skipped fraction counts, and how a per-(layer,
branch) skip budget prints.

Kept apart from the gates (torch) so that traces and their analysis read without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

BRANCHES = ("attn", "mlp")
Count = TypeVar("Count")  # an int, a NumPy array or a torch tensor of token counts


def budget_label(fractions: np.ndarray, branches: Sequence[str] = BRANCHES, total: float | None = None) -> str:
    """How a [n_layers, 2] budget prints everywhere: '0.25', '0.25 (global)' or 'mean 0.31 (per layer)'."""
    active = np.asarray(fractions)[:, [BRANCHES.index(b) for b in branches]]
    if total is not None:
        return f"{total:g} (global)"
    if np.all(active == active.flat[0]):
        return f"{float(active.flat[0]):g}"
    return f"mean {float(active.mean()):.3g} (per layer)"


def branches_per_token(n_layers: int) -> int:
    """Branch evaluations one token meets in a forward pass: both branches of every layer."""
    return n_layers * len(BRANCHES)


def branch_evaluations(eligible_tokens: Count, n_layers: int) -> Count:
    """The denominator of every skipped fraction: each eligible token's branch evaluations, both
    branch types counted whether or not they are gated (an int, array or tensor, as given)."""
    return eligible_tokens * branches_per_token(n_layers)


def skipped_fraction(skipped: float, eligible_tokens: float, n_layers: int) -> float:
    """Skipped branch evaluations over eligible ones (0.0 when nothing was eligible)."""
    denominator = branch_evaluations(eligible_tokens, n_layers)
    return float(skipped / denominator) if denominator else 0.0
