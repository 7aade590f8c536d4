"""Estimate mode: a skip plan applied to gate values already captured, without a model call.

Later layers' gates are not updated for the changed residuals (re-running the
model does that), which is why the dashboard's slider can move in milliseconds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from gateskip_core.backbone.architecture import ArchSpec
from gateskip_core.branches import BRANCHES
from gateskip_core.errors import GateSkipError
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import BranchInput
from gateskip_core.traces.compute import account_sequence
from gateskip_core.traces.trace import Trace, applied_gates


def estimate_trace(
    trace: Trace, plan: SkipPlan, spec: ArchSpec | None = None, gate_flops=(0, 0), overheads: dict | None = None
) -> Trace:
    """`trace` with `plan`'s decisions on its captured gate values; with `spec`, a new compute account."""
    if plan.forced:
        raise GateSkipError("forced decisions change later layers' inputs: use trace, not estimate")
    fractions = plan.budget.fractions
    sequences = []
    for seq in trace.sequences:
        eligible = seq.eligible.copy()
        eligible[0] = not plan.protect_bos  # the first position is always a real token
        elig_t = torch.from_numpy(eligible)[None]
        positions = torch.arange(seq.n_tokens, device="cpu")[None]  # host data: estimate runs no model
        skipped = np.zeros_like(seq.skipped)
        threshold = np.full(seq.threshold.shape, -np.inf)
        for layer in range(trace.n_layers):
            for b, branch in enumerate(BRANCHES):
                if fractions[layer, b] == 0:
                    continue
                decision = plan.policy.decide(
                    _branch_input(layer, branch, float(fractions[layer, b]), seq.gate[:, layer, b], elig_t, positions)
                )
                skipped[:, layer, b] = (decision.skip & elig_t)[0].numpy()
                threshold[:, layer, b] = decision.threshold[0].numpy()
        compute = seq.compute
        if spec is not None:
            compute = account_sequence(
                spec, skipped, gate_flops, seq.n_tokens, trace.path, kv_copy=trace.kv == "copy", **(overheads or {})
            )
        applied = applied_gates(skipped, plan.adapter_scope, trace.has_gates)
        sequences.append(
            replace(seq, skipped=skipped, gate_applied=applied, threshold=threshold, eligible=eligible, compute=compute)
        )
    return replace(
        trace,
        sequences=sequences,
        skip_budget=np.asarray(fractions, dtype=np.float64),
        branches=plan.budget.branches,
        policy=f"{plan.policy.name} (estimate)" if plan.policy is not None else "none",
        protect_bos=plan.protect_bos,
        adapter_scope=plan.adapter_scope,
    )


def _branch_input(layer, branch, budget, gate_column, eligible, positions) -> BranchInput:
    return BranchInput(
        layer=layer,
        branch=branch,
        budget=budget,
        gate=torch.from_numpy(gate_column.astype(np.float32))[None],
        eligible=eligible,
        positions=positions,
    )
