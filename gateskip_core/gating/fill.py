"""Stand-ins for skipped branches: what a skipped token's branch adds to the residual.

The paper's rule adds nothing (`zero`): a skipped token's residual passes through
unchanged. Published layer-skipping methods (FlexiDepth, DiffSkip) give skipped
tokens a cheap correction instead, which keeps far more quality. Two stand-ins:

- `mean`: one vector per (layer, branch), added to every token that skips it;
- `lowrank:R`: `up(down(x)) + bias`, a rank-R linear map of the branch input `x`
  (the normalised hidden state the gate reads), 2 * 2 * R * d FLOPs per skipped token.

A `SkipFill` holds one stand-in per (layer, branch). It is trained with the gates
(`gateskip train --skip-fill`) or fitted without training on any gate set
(`fit_fill`, `gateskip fit-fill`): ridge regression of what the branch adds on its
input, over the tokens the gates rank lowest (those that skip first), reduced to
rank R. The compute account charges it for every skipped (token, branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gateskip_core.errors import GateSkipError
from gateskip_core.validation import kind_and_rank

FILL_KINDS = ("zero", "mean", "lowrank")


@dataclass(frozen=True)
class FillSpec:
    """'zero' (the paper: nothing), 'mean' or 'lowrank:R'."""

    kind: str = "zero"
    rank: int = 0

    @classmethod
    def parse(cls, text: str | None) -> FillSpec:
        return cls(*kind_and_rank(text or "zero", "skip fill", FILL_KINDS, "lowrank", "skip fill"))

    @property
    def label(self) -> str:
        return f"lowrank:{self.rank}" if self.kind == "lowrank" else self.kind


class BranchFill(nn.Module):
    """One stand-in: a constant vector (`mean`) or `up(down(x)) + bias` (`lowrank`)."""

    def __init__(self, d_model: int, spec: FillSpec):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d_model))
        if spec.kind == "lowrank":
            # down starts as a random projection and up at zero: a new stand-in adds nothing.
            self.down = nn.Parameter(torch.randn(spec.rank, d_model) * d_model**-0.5)
            self.up = nn.Parameter(torch.zeros(d_model, spec.rank))
        else:
            self.down = self.up = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """What a skipped token with branch input `x` [..., d] adds to its residual: [..., d]."""
        if self.down is None:
            return self.bias.expand_as(x)
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def flops_per_token(self) -> int:
        d = self.bias.numel()
        return d if self.down is None else 2 * 2 * self.down.shape[0] * d + d


class SkipFill(nn.Module):
    """A stand-in for every (layer, branch) of one model."""

    def __init__(self, n_layers: int, d_model: int, spec: FillSpec):
        super().__init__()
        if spec.kind == "zero":
            raise GateSkipError("the 'zero' fill adds nothing: use no SkipFill")
        self.spec = spec
        self.n_layers = n_layers
        self.d_model = d_model
        self.attn = nn.ModuleList(BranchFill(d_model, spec) for _ in range(n_layers))
        self.mlp = nn.ModuleList(BranchFill(d_model, spec) for _ in range(n_layers))

    def fill(self, layer: int, branch: str) -> BranchFill:
        return (self.attn if branch == "attn" else self.mlp)[layer]

    def flops_per_token(self, branch: str) -> int:
        """FLOPs one skipped token spends on the stand-in of one branch (what the account charges)."""
        return self.fill(0, branch).flops_per_token()


def fill_flops(fill: SkipFill | None) -> tuple[int, int]:
    """(attention, MLP) FLOPs per skipped token; (0, 0) for the paper's zero fill."""
    return (0, 0) if fill is None else (fill.flops_per_token("attn"), fill.flops_per_token("mlp"))


def fill_tensors(fill: SkipFill | None) -> dict[str, torch.Tensor]:
    """What a checkpoint stores (keys prefixed `fill.`; float16, like the LoRA adapter)."""
    if fill is None:
        return {}
    return {f"fill.{k}": v.detach().to(torch.float16).contiguous() for k, v in fill.state_dict().items()}


def load_fill(spec: FillSpec, tensors: dict[str, torch.Tensor], n_layers: int, d_model: int) -> SkipFill | None:
    """The SkipFill stored in a checkpoint's `fill.*` tensors (None for the zero fill)."""
    if spec.kind == "zero":
        return None
    fill = SkipFill(n_layers, d_model, spec)
    state = {k.removeprefix("fill."): v for k, v in tensors.items() if k.startswith("fill.")}
    if set(state) != set(fill.state_dict()):
        raise ValueError(f"the {spec.label} skip fill has {len(state)} tensors, expected {len(fill.state_dict())}")
    fill.load_state_dict({k: v.float() for k, v in state.items()})
    for p in fill.parameters():
        p.requires_grad_(False)
    return fill.eval()
