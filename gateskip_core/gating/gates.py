"""Residual gates: g = sigmoid(W x + b) on each attention and MLP branch.

A gate reads the branch's input (the normalised hidden state the decoder layer
hands the branch), detached from the graph, and its output multiplies the
branch output before the residual add. Token importance is the mean of the
gate vector over the hidden dimension.

Gates live in a `GateSet`, an `nn.Module` separate from the backbone: attaching
gates never copies or modifies backbone weights, so removing them restores the
original model exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gateskip_core.errors import GateSkipError
from gateskip_core.validation import kind_and_rank

GateVariant = Literal["vector", "scalar", "mlp", "lowrank"]
GATE_VARIANTS: tuple[str, ...] = ("vector", "scalar", "mlp", "lowrank")
DEFAULT_LOWRANK_RANK = 16
INIT_WEIGHT_STD = 0.01
INIT_BIAS = 5.0  # sigmoid(5) = 0.993: gates start open, the model is almost unchanged


def parse_gate_variant(text: str) -> tuple[str, int]:
    """'vector' | 'scalar' | 'mlp' | 'lowrank' | 'lowrank:R' -> (variant, rank); rank is 0 unless low-rank."""
    return kind_and_rank(text, "gate variant", GATE_VARIANTS, "lowrank", "low-rank gate", DEFAULT_LOWRANK_RANK)


class BranchGate(nn.Module):
    """One gate: `vector` (d->d), `scalar` (d->1), `mlp` (d->2d->ReLU->d) or `lowrank` (d->R->d)."""

    def __init__(self, d_model: int, variant: GateVariant, rank: int = 0):
        super().__init__()
        self.variant = variant
        if variant == "lowrank":
            # Down projection without bias; the up projection carries the b = 5 bias.
            self.net = nn.Sequential(nn.Linear(d_model, rank, bias=False), nn.Linear(rank, d_model))
        elif variant == "vector":
            self.net = nn.Linear(d_model, d_model)
        elif variant == "scalar":
            self.net = nn.Linear(d_model, 1)
        elif variant == "mlp":
            self.net = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        else:
            raise ValueError(f"unknown gate variant {variant!r}; choose one of {GATE_VARIANTS}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        for lin in linears:
            nn.init.normal_(lin.weight, std=INIT_WEIGHT_STD)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.constant_(linears[-1].bias, INIT_BIAS)
        if self.variant == "lowrank":
            # Two N(0, 0.01) factors would start the gate's gradient near zero; the down
            # projection starts as a random projection instead (the product is still ~0).
            nn.init.normal_(linears[0].weight, std=linears[0].in_features ** -0.5)

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """`W x + b` (before the sigmoid) for branch input `x` [..., d]: [..., d] or [..., 1]."""
        y = x.detach()
        for step in self.net if isinstance(self.net, nn.Sequential) else (self.net,):
            # Functional calls, not module calls: a decoding step evaluates 2 x n_layers gates
            # on one token each, where module-call overhead costs as much as the matmuls.
            y = F.linear(y, step.weight, step.bias) if isinstance(step, nn.Linear) else F.relu(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate values for branch input `x` [..., d]: [..., d] or [..., 1] in (0, 1)."""
        return torch.sigmoid(self.preactivation(x))

    @property
    def is_linear(self) -> bool:
        """Whether the pre-activation is affine in the input (every variant but `mlp`)."""
        return self.variant != "mlp"

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one gate evaluation (the sigmoid is not counted)."""
        return sum(2 * m.in_features * m.out_features for m in self.net.modules() if isinstance(m, nn.Linear))


class GateSet(nn.Module):
    """Gates for every (layer, branch) of one model; per layer or shared across layers."""

    def __init__(
        self, n_layers: int, d_model: int, variant: GateVariant = "vector", shared: bool = False, rank: int = 0
    ):
        super().__init__()
        if variant not in GATE_VARIANTS:
            raise GateSkipError(f"unknown gate variant {variant!r}; choose one of {GATE_VARIANTS}")
        if variant == "lowrank" and rank < 1:
            rank = DEFAULT_LOWRANK_RANK
        self.n_layers = n_layers
        self.d_model = d_model
        self.variant = variant
        self.rank = rank if variant == "lowrank" else 0
        self.shared = shared
        n_modules = 1 if shared else n_layers
        self.attn = nn.ModuleList(BranchGate(d_model, variant, self.rank) for _ in range(n_modules))
        self.mlp = nn.ModuleList(BranchGate(d_model, variant, self.rank) for _ in range(n_modules))

    def gate(self, layer: int, branch: str) -> BranchGate:
        gates = self.attn if branch == "attn" else self.mlp
        return gates[0 if self.shared else layer]

    def flops_per_token(self, branch: str) -> int:
        """FLOPs of evaluating one branch's gate for one token."""
        return self.gate(0, branch).flops_per_token()

    @property
    def batchable(self) -> bool:
        """Whether `mean_gates` can evaluate several cells' gates in one batched call (low-rank and
        scalar gates: their weights stacked over every cell are small)."""
        return self.variant in ("lowrank", "scalar")

    def mean_gates(self, cells: list[int], x: torch.Tensor) -> torch.Tensor:
        """The mean gate value [n] of each cell (`layer * 2 + branch index`) for its own input row
        x [n, d]: every cell's gate in one batched matmul per step of the gate, not one call per cell."""
        stacked = self._stacked()
        if cells != list(range(stacked[0].shape[0])):  # every cell, in order: no gather needed
            index = torch.tensor(cells, device=x.device)
            stacked = [t.index_select(0, index) for t in stacked]
        y = x[:, None, :]
        for i, weight_t in enumerate(stacked[:-1]):
            y = torch.bmm(y, weight_t) if i < len(stacked) - 2 else torch.baddbmm(stacked[-1], y, weight_t)
        return torch.sigmoid(y).mean(-1).float()[:, 0]

    def _stacked(self) -> list[torch.Tensor]:
        """Every cell's gate weights, transposed and stacked [2L, in, out] per linear step, then the
        last step's bias [2L, 1, out]; cached until a parameter changes."""
        stamp = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cached = getattr(self, "_stacked_cache", None)
        if cached is None or cached[0] != stamp:
            gates = [self.gate(layer, branch) for layer in range(self.n_layers) for branch in ("attn", "mlp")]
            linears = [[m for m in g.net.modules() if isinstance(m, nn.Linear)] for g in gates]
            steps = [torch.stack([ls[i].weight.detach().t() for ls in linears]) for i in range(len(linears[0]))]
            bias = torch.stack([ls[-1].bias.detach()[None] for ls in linears])
            cached = (stamp, steps + [bias])
            self._stacked_cache = cached
        return cached[1]

    @property
    def variant_label(self) -> str:
        """'vector', 'scalar', 'mlp' or 'lowrank:R' (what `parse_gate_variant` reads)."""
        return f"lowrank:{self.rank}" if self.variant == "lowrank" else self.variant

    def describe(self) -> str:
        return f"{self.variant_label} gates ({'shared' if self.shared else 'per layer'})"
