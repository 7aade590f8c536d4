"""Decisions of a call that feeds one token (a decoding step at batch 1), without per-branch tensors.

The walk's general decision (`skipping.plan.branch_decision`) works on [B, T] tensors: a threshold
tensor, a comparison, an `&` with eligibility, a count read back, and a record per branch stacked
when the walk ends. For one token under a threshold policy (`calibrated`, or a budget of 0) each of
those is a tensor of one element, and issuing them one by one, 60 branches per step, cost more than
the gates' matmuls. Here the token's mean gate is read once per branch and compared in Python with
the threshold as float32 (the comparison the tensor path makes, so the decisions are the same), and
the records are Python numbers made into the call's [1, 1, L, 2] tensors once.

A branch that cannot skip (threshold -inf: a budget of 0) and whose gate does not scale its output
(adapter scope `skipped`, before the token's first skip: the original model) needs its gate only for
the record: its input is kept and every such gate is evaluated when the walk ends, in one batched
call (`GateSet.mean_gates`), instead of one gate call per branch. At budget 0 that is every branch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gateskip_core.branches import BRANCHES
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import CalibratedPolicy


class OneTokenDecisions:
    """The decisions and records of one call over a single token (`applies` says when it can be used)."""

    def __init__(self, plan: SkipPlan, n_layers: int, eligible: bool, device: torch.device):
        budgets = plan.budget.fractions
        if plan.budget.is_zero():
            table = np.full((n_layers, 2), -math.inf)
        else:
            # float32, as the tensor path compares (torch.full_like(gate, threshold) of a float32 gate)
            table = np.where(budgets > 0, plan.policy.thresholds.astype(np.float32), -math.inf)
        self.thresholds: list[list[float]] = table.astype(np.float64).tolist()
        self.eligible = eligible
        self.masks = (
            torch.zeros(1, 1, dtype=torch.bool, device=device),
            torch.ones(1, 1, dtype=torch.bool, device=device),
        )
        self.gates: list[float] = []
        self.used: list[float] = []
        self.skips: list[bool] = []
        self.deferred: list[
            tuple[int, torch.Tensor]
        ] = []  # (record index, branch input [1, 1, d]) to evaluate at the end

    @staticmethod
    def applies(plan: SkipPlan, n_tokens: int, gate_tensors_recorded: bool) -> bool:
        """One token, no forced cells, no gate tensors to record, and a policy that compares with a
        fixed threshold (or nothing can skip)."""
        threshold_policy = plan.budget.is_zero() or isinstance(plan.policy, CalibratedPolicy)
        return n_tokens == 1 and not plan.forced and not gate_tensors_recorded and threshold_policy

    def can_defer(self, layer: int, branch: int) -> bool:
        """Whether (layer, branch) cannot skip, so its gate is needed only for the record."""
        return self.thresholds[layer][branch] == -math.inf

    def defer(self, layer: int, branch: int, x: torch.Tensor) -> None:
        """Record (layer, branch) as not skipped; its gate on input `x` is evaluated in `records`."""
        self.deferred.append((len(self.gates), x))
        self.gates.append(math.nan)
        self.used.append(-math.inf)
        self.skips.append(False)

    def decide(self, layer: int, branch: int, g: torch.Tensor | None) -> bool:
        """Whether the token skips (layer, branch), from its gate vector `g` [1, 1, d|1] (None: no gates)."""
        gate = 1.0 if g is None else g.detach().mean(-1).float().item()  # the tensor path's mean, read once
        threshold = self.thresholds[layer][branch]
        skip = self.eligible and gate <= threshold
        self.gates.append(gate)
        self.used.append(threshold)
        self.skips.append(skip)
        return skip

    def records(self, n_layers: int, device: torch.device, gates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, threshold, skipped) [1, 1, L, 2], in the walk's order (layer, then attn/mlp); the
        deferred gates evaluated now, in one batched call over their cells (`gates`: the `GateSet`)."""
        shape = (1, 1, n_layers, len(BRANCHES))
        gate = torch.tensor(self.gates, dtype=torch.float32, device=device)
        if self.deferred:
            cells = [index for index, _ in self.deferred]
            x = torch.cat([x.reshape(1, -1) for _, x in self.deferred])
            gate[cells] = gates.mean_gates(cells, x).to(device)
        return (
            gate.view(shape),
            torch.tensor(self.used, dtype=torch.float32, device=device).view(shape),
            torch.tensor(self.skips, dtype=torch.bool, device=device).view(shape),
        )
