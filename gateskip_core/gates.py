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
from torch import nn

GateVariant = Literal["vector", "scalar", "mlp"]
BRANCHES = ("attn", "mlp")
GATE_VARIANTS: tuple[str, ...] = ("vector", "scalar", "mlp")
INIT_WEIGHT_STD = 0.01
INIT_BIAS = 5.0  # sigmoid(5) = 0.993: gates start open, the model is almost unchanged


class BranchGate(nn.Module):
    """One gate: `vector` (d->d), `scalar` (d->1) or `mlp` (d->2d->ReLU->d)."""

    def __init__(self, d_model: int, variant: GateVariant):
        super().__init__()
        self.variant = variant
        if variant == "vector":
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
            nn.init.zeros_(lin.bias)
        nn.init.constant_(linears[-1].bias, INIT_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate values for branch input `x` [..., d]: [..., d] or [..., 1] in (0, 1)."""
        return torch.sigmoid(self.net(x.detach()))

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one gate evaluation (the sigmoid is not counted)."""
        return sum(2 * m.in_features * m.out_features for m in self.net.modules() if isinstance(m, nn.Linear))


class GateSet(nn.Module):
    """Gates for every (layer, branch) of one model; per layer or shared across layers."""

    def __init__(self, n_layers: int, d_model: int, variant: GateVariant = "vector", shared: bool = False):
        super().__init__()
        if variant not in GATE_VARIANTS:
            raise ValueError(f"unknown gate variant {variant!r}; choose one of {GATE_VARIANTS}")
        self.n_layers = n_layers
        self.d_model = d_model
        self.variant = variant
        self.shared = shared
        n_modules = 1 if shared else n_layers
        self.attn = nn.ModuleList(BranchGate(d_model, variant) for _ in range(n_modules))
        self.mlp = nn.ModuleList(BranchGate(d_model, variant) for _ in range(n_modules))

    def gate(self, layer: int, branch: str) -> BranchGate:
        gates = self.attn if branch == "attn" else self.mlp
        return gates[0 if self.shared else layer]

    def flops_per_token(self, branch: str) -> int:
        """FLOPs of evaluating one branch's gate for one token."""
        return self.gate(0, branch).flops_per_token()

    def describe(self) -> str:
        return f"{self.variant} gates ({'shared' if self.shared else 'per layer'})"
