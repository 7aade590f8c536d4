"""Gate faithfulness: do gates rank what matters?

For one text, every (token, layer, branch) entry gets
- its gate importance (mean gate value), and
- the effect of skipping it on the next-token loss, estimated to first order by
  attribution patching: grad(loss wrt the residual after the branch) . (-branch contribution);
- for a random sample of entries, the exact effect: re-run the model with only
  that entry skipped, and take the change in loss (this checks the estimate).
Reported: Spearman correlations between importance and estimated effect per
(layer, branch) and overall, and between the estimate and the exact effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from gateskip_core import BRANCHES, Capture, GatedModel, GateSkipError, SkipBudget, SkipPlan
from gateskip_core.policies import BranchInput, Decision, SkipPolicy


@dataclass(frozen=True)
class SingleEntryPolicy(SkipPolicy):
    """Skip exactly one (position, layer, branch)."""

    position: int = 0
    name: str = "single-entry"
    needs_gates: bool = False

    def decide(self, inp: BranchInput) -> Decision:
        skip = inp.eligible & (inp.positions == self.position)
        return Decision(skip=skip, threshold=torch.full(skip.shape, float("nan")))


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def faithfulness(model: GatedModel, text: str, n_exact: int = 32, seed: int = 0, max_tokens: int = 256):
    """(entries, summary) DataFrames; see the branch docstring."""
    if model.gates is None:
        raise GateSkipError("faithfulness needs gates; load gates first")
    batch = model.encode([text], max_tokens=max_tokens)
    ids = batch.input_ids
    T, L = ids.shape[1], model.spec.n_layers
    if T < 4:
        raise GateSkipError("text is too short for a faithfulness analysis (need at least 4 tokens)")
    plan = SkipPlan(SkipBudget.make(0.0, L), None)
    with torch.enable_grad():
        out = model.walk(ids, torch.ones_like(ids), plan, capture=Capture(branch_deltas=True))
        base_loss = _loss(out.logits, ids)
        base_loss.backward()
    estimate = np.zeros((T, L, 2))
    for i, delta in enumerate(out.branch_deltas):
        layer, b = divmod(i, 2)
        estimate[:, layer, b] = -(delta.grad[0] * delta.detach()[0]).sum(-1).numpy()
    gate = out.gate[0].numpy()

    # Entries: positions 1 .. T-2 (BOS is protected; the last token's output has no target).
    positions = np.arange(1, T - 1)
    rows = [(p, layer, b) for p in positions for layer in range(L) for b in range(2)]
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(rows), size=min(n_exact, len(rows)), replace=False)
    exact = np.full(len(rows), np.nan)
    base = float(base_loss.detach())
    for idx in sample:
        p, layer, b = rows[idx]
        table = np.zeros((L, 2))
        table[layer, b] = 1.0
        single = SkipPlan(SkipBudget.make(table, L), SingleEntryPolicy(int(p)))
        with torch.no_grad():
            ablated = model.walk(ids, torch.ones_like(ids), single)
        exact[idx] = float(_loss(ablated.logits, ids)) - base
    tokens = model.token_strings(ids[0].tolist())
    entries = pd.DataFrame(
        {
            "position": [r[0] for r in rows],
            "token": [tokens[r[0]] for r in rows],
            "layer": [r[1] for r in rows],
            "branch": [BRANCHES[r[2]] for r in rows],
            "gate": [gate[r] for r in rows],
            "estimated_effect": [estimate[r] for r in rows],
            "exact_effect": exact,
        }
    )
    summary = []
    for (layer, branch), part in entries.groupby(["layer", "branch"], sort=True):
        summary.append(
            {
                "scope": f"layer {layer}",
                "layer": layer,
                "branch": branch,
                "n": len(part),
                "spearman": _spearman(part["gate"].to_numpy(), part["estimated_effect"].to_numpy()),
            }
        )
    for branch, part in entries.groupby("branch", sort=False):
        summary.append(
            {
                "scope": "overall",
                "layer": -1,
                "branch": branch,
                "n": len(part),
                "spearman": _spearman(part["gate"].to_numpy(), part["estimated_effect"].to_numpy()),
            }
        )
    summary.append(
        {
            "scope": "overall",
            "layer": -1,
            "branch": "both",
            "n": len(entries),
            "spearman": _spearman(entries["gate"].to_numpy(), entries["estimated_effect"].to_numpy()),
        }
    )
    sampled = entries.dropna(subset=["exact_effect"])
    summary.append(
        {
            "scope": "estimate vs exact",
            "layer": -1,
            "branch": "both",
            "n": len(sampled),
            "spearman": _spearman(sampled["estimated_effect"].to_numpy(), sampled["exact_effect"].to_numpy()),
        }
    )
    return entries, pd.DataFrame(summary)
