"""How much each branch matters: the sensitivity profile the global allocation spends a budget by
(`skipping/allocation.py`). Measured by running the original model with one branch skipped for
every token at a time, so it lives with training (which measures it once, before the first step,
and stores it in the checkpoint) rather than in `skipping/`, which decides skips without running
a model."""

from __future__ import annotations

import numpy as np
import torch

from gateskip_core.backbone.architecture import ArchSpec
from gateskip_core.forward.execution import gated_forward
from gateskip_core.reference import kl_to_reference, log_probs
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import RandomPolicy, SkipBudget


def measure_sensitivity(spec: ArchSpec, blocks: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """[n_layers, 2]: mean KL(model || model with that one branch skipped for every token but BOS),
    on token `blocks` [N, T]. The backbone is run without gates (one pass per branch, plus one)."""
    sensitivity = np.zeros((spec.n_layers, 2))
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start : start + batch_size]
            mask = torch.ones_like(ids)
            none = SkipPlan(SkipBudget.make(0.0, spec.n_layers), None)
            ref = log_probs(gated_forward(spec, None, ids, mask, none).logits)
            for layer in range(spec.n_layers):
                for bi in range(2):
                    table = np.zeros((spec.n_layers, 2))
                    table[layer, bi] = 1.0
                    plan = SkipPlan(SkipBudget.make(table, spec.n_layers), RandomPolicy())
                    lp = log_probs(gated_forward(spec, None, ids, mask, plan).logits)
                    kl = kl_to_reference(ref, lp).mean()
                    sensitivity[layer, bi] += float(kl) * len(ids) / len(blocks)
    return sensitivity
