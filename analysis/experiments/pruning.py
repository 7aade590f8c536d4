"""Pruning plus gates (`shortgpt+gateskip:K`): remove K whole layers, then gate the rest at budget b.

The K layers removed are the K lowest in ShortGPT's Block Influence (`sweep.block_influence`),
measured on the calibration split (as ShortGPT does, and so that the evaluated text tunes nothing).
Removal runs through the gated walk, as the `shortgpt` baseline's does: every token, BOS included,
skips both branches of a removed layer. So a removed layer's branches add the gates' stand-ins
where the gates have them, tokens run the gates' adapter from there on (adapter scope `skipped`),
and the compute account charges what the walk does there (keys/values, gates, stand-ins), the
same account `shortgpt` rows and GateSkip's skips get.

In the kept layers the gates' policy skips as it would alone, BOS protected: the budget b is spread
over the kept layers only (global allocation: the same rule as `GatedModel.budget`, with the removed
layers given no weight; uniform: b in every kept layer). With K = 0 it is `gateskip` at b.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from gateskip_core import GatedModel, GateSkipError, SkipBudget, SkipPlan
from gateskip_core.branches import BRANCHES
from gateskip_core.skipping.allocation import allocate_budget
from gateskip_core.skipping.policies import BranchInput, Decision, SkipPolicy
from gateskip_core.traces.compute import branch_saving_flops

PRUNED_METHOD = "shortgpt+gateskip"


def prune_count(method: str, n_layers: int | None = None) -> int | None:
    """K of a `shortgpt+gateskip:K` method name; None for any other method. Checks K."""
    if not method.startswith(PRUNED_METHOD):
        return None
    head, sep, k = method.partition(":")
    if head != PRUNED_METHOD or not sep:
        raise GateSkipError(f"method {method!r}: give the number of layers to remove, e.g. {PRUNED_METHOD}:2")
    if not k.isdigit():
        raise GateSkipError(f"method {method!r}: the layers to remove must be a whole number >= 0, got {k!r}")
    if n_layers is not None and int(k) >= n_layers:
        raise GateSkipError(f"method {method!r}: cannot remove {k} of the model's {n_layers} layers")
    return int(k)


def check_method_names(methods: Sequence[str], known: Sequence[str]) -> list[str]:
    """Known names or `shortgpt+gateskip:K` specs, non-empty; one-line errors otherwise."""
    methods = [m.strip() for m in methods if m.strip()]
    bad = [m for m in methods if m not in known and prune_count(m) is None]
    if bad or not methods:
        choices = ", ".join([*known, f"{PRUNED_METHOD}:K"])
        raise GateSkipError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {choices}")
    return methods


def lowest_influence(influence: np.ndarray, k: int) -> list[int]:
    """The k layers of lowest Block Influence, sorted."""
    return sorted(int(layer) for layer in np.argsort(influence, kind="stable")[:k])


@dataclass(frozen=True)
class PrunedPolicy(SkipPolicy):
    """Every token (BOS too: the plan protects none) skips the `removed` layers; elsewhere `inner`
    decides, seeing the eligibility it would see alone (BOS protected)."""

    removed: frozenset = frozenset()
    inner: SkipPolicy | None = None
    name: str = PRUNED_METHOD

    @property
    def needs_gates(self) -> bool:  # type: ignore[override]
        return self.inner is not None and self.inner.needs_gates

    def decide(self, inp: BranchInput) -> Decision:
        if inp.layer in self.removed:
            return Decision(
                skip=inp.eligible.clone(), threshold=torch.full(inp.gate.shape, math.nan, device=inp.gate.device)
            )
        return self.inner.decide(_without_bos(inp))


def _without_bos(inp: BranchInput) -> BranchInput:
    """The input as a BOS-protecting plan would give it: position 0 not eligible, in this call and
    in the cached history (where BOS is each row's first eligible slot)."""
    history = inp.history_eligible
    if history is not None:
        first = history.long().cumsum(1) == 1
        history = history & ~(first & history)
    return replace(inp, eligible=inp.eligible & (inp.positions > 0), history_eligible=history)


def kept_budget(model: GatedModel, removed: Sequence[int], skip: float, allocation: str = "auto") -> np.ndarray:
    """[n_layers, 2] skip rates: `skip` spread over the kept layers as `allocation` says; 1 where removed."""
    n_layers = model.spec.n_layers
    total = float(SkipBudget.make(skip, n_layers).fractions[0, 0])  # validates the number
    sensitivity = model.checkpoint.sensitivity if model.checkpoint is not None else None
    if allocation == "auto":
        allocation = "global" if sensitivity is not None else "uniform"
    kept = np.ones((n_layers, len(BRANCHES)), bool)
    kept[list(removed)] = False
    if allocation == "uniform":
        table = np.where(kept, total, 0.0)
    elif allocation == "global":
        if sensitivity is None:
            raise GateSkipError("allocation 'global' needs gates trained with a sensitivity profile; use 'uniform'")
        weights = np.where(kept, branch_saving_flops(model.spec), 0.0)  # removed layers take no share
        table = allocate_budget(total, sensitivity, weights)
    else:
        raise GateSkipError(f"allocation must be one of uniform, global or auto, got {allocation!r}")
    table[~kept] = 1.0
    return table


def pruned_plan(
    model: GatedModel,
    removed: Sequence[int],
    skip: float,
    policy: str = "quantile",
    allocation: str = "auto",
    **plan_args,
) -> SkipPlan:
    """The plan of `shortgpt+gateskip`: `removed` layers skipped by every token, `skip` gated in the rest.
    With nothing removed it is the gates' own plan at `skip`."""
    if not removed:
        return model.make_plan(skip, policy, allocation=allocation, **plan_args)
    table = kept_budget(model, removed, skip, allocation)
    gated = model.make_plan(table, policy, **plan_args)
    return replace(gated, protect_bos=False, policy=PrunedPolicy(frozenset(removed), gated.policy))
