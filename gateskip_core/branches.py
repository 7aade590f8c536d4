"""The two gated branches of every layer, and how a per-(layer, branch) skip budget prints.

Kept apart from the gates (torch) so that traces and their analysis read without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BRANCHES = ("attn", "mlp")


def budget_label(fractions: np.ndarray, branches: Sequence[str] = BRANCHES, total: float | None = None) -> str:
    """How a [n_layers, 2] budget prints everywhere: '0.25', '0.25 (global)' or 'mean 0.31 (per layer)'."""
    active = np.asarray(fractions)[:, [BRANCHES.index(b) for b in branches]]
    if total is not None:
        return f"{total:g} (global)"
    if np.all(active == active.flat[0]):
        return f"{float(active.flat[0]):g}"
    return f"mean {float(active.mean()):.3g} (per layer)"
