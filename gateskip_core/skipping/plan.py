"""The skip plan of one call, and how it turns a branch's mean gates into skip decisions.

`SkipPlan` is everything that steers skipping in one call (budget, policy, execution path, kv
mode, forced decisions, adapter scope); `branch_decision` applies it to one branch: the policy's
decisions under the budget, then the forced ones. The forward walk (`forward.execution`) reads
both; nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gateskip_core.errors import GateSkipError
from gateskip_core.skipping.policies import BranchInput, Forced, SkipBudget, SkipPolicy

ExecutionPath = Literal["masked", "physical"]
KVMode = Literal["compute", "copy"]
AdapterScope = Literal["all", "skipped"]
SkipGradient = Literal["none", "straight-through"]
EXECUTION_PATHS = ("masked", "physical")
KV_MODES = ("compute", "copy")
ADAPTER_SCOPES = ("all", "skipped")
SKIP_GRADIENTS = ("none", "straight-through")


@dataclass(frozen=True)
class SkipPlan:
    """Everything that steers skipping in one call."""

    budget: SkipBudget
    policy: SkipPolicy | None
    path: ExecutionPath = "masked"
    kv: KVMode = "compute"
    protect_bos: bool = True
    forced: tuple[Forced, ...] = ()  # decisions that override the policy's
    adapter_scope: AdapterScope = "all"
    # Training only (masked path): "straight-through" gives every gate the gradient it would get if it
    # scaled its branch's output in place of the hard decision, so a skipped token's gate learns
    # what its skip cost; the forward values are unchanged.
    skip_gradient: SkipGradient = "none"

    def __post_init__(self) -> None:
        if self.path not in EXECUTION_PATHS:
            raise GateSkipError(f"execution path must be one of {EXECUTION_PATHS}, got {self.path!r}")
        if self.adapter_scope not in ADAPTER_SCOPES:
            raise GateSkipError(f"adapter scope must be one of {ADAPTER_SCOPES}, got {self.adapter_scope!r}")
        if self.kv not in KV_MODES:
            raise GateSkipError(f"kv mode must be one of {KV_MODES}, got {self.kv!r}")
        if self.policy is None and not self.budget.is_zero():
            raise GateSkipError("a non-zero skip budget needs a skip policy")
        if self.skip_gradient not in SKIP_GRADIENTS:
            raise GateSkipError(f"skip gradient must be one of {SKIP_GRADIENTS}, got {self.skip_gradient!r}")
        if self.skip_gradient != "none" and self.path != "masked":
            raise GateSkipError("a straight-through skip gradient needs the masked path")


def branch_decision(
    plan: SkipPlan,
    layer: int,
    branch: str,
    gate: torch.Tensor,
    eligible: torch.Tensor,
    positions: torch.Tensor,
    history_gate: torch.Tensor | None = None,
    history_eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip mask [B, T] and thresholds [B, T] of one branch from its mean gates [B, T]: the
    policy's decisions under the plan's budget, then the plan's forced ones (NaN threshold)."""
    budget = plan.budget.at(layer, branch)
    if budget <= 0:
        skip = torch.zeros_like(eligible)
        threshold = torch.full(gate.shape, float("-inf"), device=gate.device)
    else:
        decision = plan.policy.decide(
            BranchInput(
                layer=layer,
                branch=branch,
                budget=budget,
                gate=gate,
                eligible=eligible,
                positions=positions,
                history_gate=history_gate,
                history_eligible=history_eligible,
            )
        )
        skip = decision.skip & eligible
        threshold = decision.threshold.to(torch.float32).expand(gate.shape)
    for forced in plan.forced:
        if forced.layer == layer and forced.branch == branch:
            # Forced skips respect eligibility (padding, a protected BOS); forced runs apply to any real token.
            at = positions == forced.position
            at = at & eligible if forced.skip else at
            skip = torch.where(at, torch.tensor(forced.skip, device=skip.device), skip)
            threshold = threshold.masked_fill(at, float("nan"))
    return skip, threshold
