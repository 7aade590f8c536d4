"""Skip budgets and skip policies, passed per call.

A *budget* says, for every (layer, branch), what fraction of the eligible tokens
that branch should skip. A *policy* turns a branch's token importances into skip
decisions under that budget. Policies are small immutable objects: the gated
forward calls `policy.decide(...)` once per branch and keeps nothing on modules.

Eligible tokens: real (not padding) tokens, except the first position when
`protect_bos` is on. Why protect the first token: it is the attention sink every
later token attends to (the paper finds BOS gates highest in early layers);
skipping it perturbs every later position at once, for a saving of one token.

Every policy's decisions obey the same rule: a token skips iff it is eligible
and its importance is `<= threshold` (quantile: rank-based, see below).
A threshold of -inf skips nothing; NaN means the policy uses no threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gateskip_core.branches import BRANCHES, budget_label
from gateskip_core.errors import GateSkipError

BranchSet = tuple[str, ...]


def parse_branches(branches: str | Sequence[str]) -> BranchSet:
    """'both' | 'attn' | 'mlp' | 'attn,mlp' | ['attn', 'mlp'] -> ('attn', 'mlp')."""
    if isinstance(branches, str):
        branches = BRANCHES if branches == "both" else tuple(b.strip() for b in branches.split(",") if b.strip())
    out = tuple(b for b in BRANCHES if b in branches)
    unknown = set(branches) - set(BRANCHES)
    if unknown or not out:
        raise GateSkipError(f"branch types must be 'attn', 'mlp' or 'both', got {list(branches)!r}")
    return out


@dataclass(frozen=True)
class SkipBudget:
    """Fraction of eligible tokens to skip, per (layer, branch): `fractions` is [n_layers, 2]."""

    fractions: np.ndarray
    branches: BranchSet = BRANCHES
    total: float | None = None  # set when a global allocation spread this compute budget

    @classmethod
    def make(
        cls,
        skip: float | Sequence[float] | np.ndarray | SkipBudget,
        n_layers: int,
        branches: str | Sequence[str] = BRANCHES,
        total: float | None = None,
    ) -> SkipBudget:
        """One value for all, one per layer, or a [n_layers, 2] table (attn, mlp)."""
        if isinstance(skip, SkipBudget):
            if skip.fractions.shape != (n_layers, 2):
                raise GateSkipError(f"skip budget is for {skip.fractions.shape[0]} layers, model has {n_layers}")
            return skip
        allowed = parse_branches(branches)
        try:
            arr = np.asarray(skip, dtype=np.float64)
        except (TypeError, ValueError):
            raise GateSkipError(f"skip budget must be a number in [0, 1], got {skip!r}") from None
        if arr.ndim == 0:
            arr = np.full((n_layers, 2), float(arr))
        elif arr.shape == (n_layers,):
            arr = np.repeat(arr[:, None], 2, axis=1)
        elif arr.shape != (n_layers, 2):
            raise GateSkipError(
                f"skip budget must be one number, {n_layers} per-layer numbers or a {n_layers}x2 table; "
                f"got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise GateSkipError(f"skip budget must lie in [0, 1], got {skip!r}")
        arr = arr.copy()
        for i, name in enumerate(BRANCHES):
            if name not in allowed:
                arr[:, i] = 0.0
        arr.setflags(write=False)
        return cls(fractions=arr, branches=allowed, total=total)

    def at(self, layer: int, branch: str) -> float:
        return float(self.fractions[layer, BRANCHES.index(branch)])

    def is_zero(self) -> bool:
        return bool(self.fractions.max() == 0)

    def is_uniform(self) -> bool:
        active = self.fractions[:, [BRANCHES.index(b) for b in self.branches]]
        return bool(np.all(active == active.flat[0]))

    def describe(self) -> str:
        return budget_label(self.fractions, self.branches, self.total)


@dataclass(frozen=True)
class Forced:
    """One decision taken out of the policy's hands: the token at `position` (0 = first real
    token) skips (`skip=True`) or runs `branch` at `layer`, whatever its gate. Forced cells get
    a NaN threshold in traces. The TransformerLens bridge's `hook_skip` overrides are the same thing."""

    layer: int
    branch: str
    position: int
    skip: bool = True

    def check(self, n_layers: int, protect_bos: bool) -> None:
        if self.branch not in BRANCHES:
            raise GateSkipError(f"forced decision: branch must be 'attn' or 'mlp', got {self.branch!r}")
        for name, value, limit in (("layer", self.layer, n_layers), ("position", self.position, None)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise GateSkipError(f"forced decision: {name} must be a whole number >= 0, got {value!r}")
            if limit is not None and value >= limit:
                raise GateSkipError(f"forced decision: layer {value} does not exist (model has {limit} layers)")
        if self.skip and self.position == 0 and protect_bos:
            raise GateSkipError("forced decision: position 0 (BOS) is protected; pass protect_bos=False to skip it")


@dataclass(frozen=True)
class BranchInput:
    """What a policy sees for one (layer, branch) of one forward call."""

    layer: int
    branch: str
    budget: float
    gate: torch.Tensor  # [B, T] mean gate value per token
    eligible: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T] position of each token in its sequence (0 = first real token)
    # Earlier tokens of the same sequences (cached generation): [B, S] importances and eligibility.
    history_gate: torch.Tensor | None = None
    history_eligible: torch.Tensor | None = None


@dataclass(frozen=True)
class Decision:
    skip: torch.Tensor  # [B, T] bool
    threshold: torch.Tensor  # [B, T] float


class SkipPolicy:
    """Base class: `decide` maps one branch's importances to skip decisions."""

    name: str = "?"
    needs_gates: bool = True

    def decide(self, inp: BranchInput) -> Decision:
        raise NotImplementedError


def _kth_smallest_skip(values: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> Decision:
    """Skip the k[b] lowest eligible values of each row (ties broken by position)."""
    masked = torch.where(eligible, values, torch.full_like(values, math.inf))
    order = torch.sort(masked, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))
    skip = eligible & (rank < k[:, None])
    sorted_vals = torch.gather(masked, 1, order)
    kth = torch.gather(sorted_vals, 1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
    threshold = torch.where(k > 0, kth, torch.full_like(kth, -math.inf))
    return Decision(skip=skip, threshold=threshold[:, None].expand_as(values).clone())


@dataclass(frozen=True)
class QuantilePolicy(SkipPolicy):
    """The paper's rule, per sequence: skip the floor(b * n) least important eligible tokens.

    Decisions never couple the sequences of a batch. Over a whole prompt this rule
    looks at later tokens (it is not causal). In cached generation each new token
    is ranked against its own sequence's earlier eligible tokens (a running
    quantile), since it cannot see the future.
    """

    name: str = "quantile"

    def decide(self, inp: BranchInput) -> Decision:
        if inp.history_gate is None:
            k = torch.floor(inp.budget * inp.eligible.sum(1).double() + 1e-9).long()
            return _kth_smallest_skip(inp.gate, inp.eligible, k)
        return self._running(inp)

    def _running(self, inp: BranchInput) -> Decision:
        skips, thresholds = [], []
        hist_v, hist_e = inp.history_gate, inp.history_eligible
        for t in range(inp.gate.shape[1]):
            values = torch.cat([hist_v, inp.gate[:, : t + 1]], dim=1)
            elig = torch.cat([hist_e, inp.eligible[:, : t + 1]], dim=1)
            k = torch.floor(inp.budget * elig.sum(1).double() + 1e-9).long()
            sorted_vals = torch.sort(torch.where(elig, values, torch.full_like(values, math.inf)), dim=1).values
            kth = torch.gather(sorted_vals, 1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
            thr = torch.where(k > 0, kth, torch.full_like(kth, -math.inf))
            skips.append(inp.eligible[:, t] & (inp.gate[:, t] <= thr))
            thresholds.append(thr)
        return Decision(skip=torch.stack(skips, 1), threshold=torch.stack(thresholds, 1))


@dataclass(frozen=True)
class CalibratedPolicy(SkipPolicy):
    """Fixed per-(layer, branch) thresholds fitted on calibration text: causal and per token.

    `thresholds` is [n_layers, 2] (attn, mlp); -inf where a branch never skips.
    The same token gets the same decision in prefill and in cached generation.
    """

    thresholds: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    budget: SkipBudget | None = None
    name: str = "calibrated"

    def decide(self, inp: BranchInput) -> Decision:
        thr = float(self.thresholds[inp.layer, BRANCHES.index(inp.branch)])
        threshold = torch.full_like(inp.gate, thr)
        return Decision(skip=inp.eligible & (inp.gate <= threshold), threshold=threshold)


def _uniform_hash(seed: int, positions: np.ndarray, layer: int, branch: int) -> np.ndarray:
    """Counter-based uniform numbers in [0, 1): splitmix64 of (seed, position, layer, branch)."""
    with np.errstate(over="ignore"):
        x = (
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            + positions.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            + np.uint64(layer * 2 + branch + 1) * np.uint64(0x94D049BB133111EB)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class RandomPolicy(SkipPolicy):
    """Baseline: each eligible token skips with probability b, independent of its gate.

    The draw depends only on (seed, position, layer, branch), so it is reproducible,
    causal and independent of batching.
    """

    seed: int = 0
    name: str = "random"
    needs_gates: bool = False

    def decide(self, inp: BranchInput) -> Decision:
        u = _uniform_hash(self.seed, inp.positions.cpu().numpy(), inp.layer, BRANCHES.index(inp.branch))
        skip = inp.eligible & (torch.from_numpy(u).to(inp.eligible.device) < inp.budget)
        return Decision(skip=skip, threshold=torch.full(inp.eligible.shape, math.nan, device=inp.eligible.device))


POLICY_NAMES = ("quantile", "calibrated", "random")


def resolve_policy(policy: str | SkipPolicy, seed: int, calibrated: Callable[[], SkipPolicy]) -> SkipPolicy:
    """A policy object from a name; `calibrated()` fits or looks up the thresholds when asked for."""
    if isinstance(policy, SkipPolicy):
        return policy
    if policy == "quantile":
        return QuantilePolicy()
    if policy == "random":
        return RandomPolicy(seed=seed)
    if policy == "calibrated":
        return calibrated()
    raise GateSkipError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}")
