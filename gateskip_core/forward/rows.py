"""Rows of a call: the packed tokens that run a branch (`Rows`, `pack_rows`), and which rows of a
projection add the LoRA adapter's delta (`AdapterRows`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gateskip_core.gating.adapter import LoraAdapter


class Rows(NamedTuple):
    """The tokens of a call that run a branch, packed (`pack_rows`): `flat` indexes the call's B*T
    rows (a gather or scatter by `flat` is several times faster than by (batch, position) pairs)."""

    mask: torch.Tensor  # [B, T] the tokens these rows are
    flat: torch.Tensor  # [N]

    def per_sequence(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Each row's sequence and place among its own sequence's rows, and the most rows any
        sequence has: where the rows go when they are padded per sequence."""
        T = self.mask.shape[1]
        rank = (self.mask.long().cumsum(1) - 1).reshape(-1).index_select(0, self.flat)
        return self.flat // T, rank, int(self.mask.sum(1).max())

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """These rows of a per-token tensor [B, T, ...] -> [N, ...] (None passes: no rotary)."""
        return None if t is None else t.reshape(-1, *t.shape[2:]).index_select(0, self.flat)

    def add_to(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h [B, T, ...] with y [N, ...] added on these rows (a new tensor)."""
        return h.reshape(-1, *h.shape[2:]).index_add(0, self.flat, y.to(h.dtype)).view(h.shape)


def pack_rows(run: torch.Tensor) -> Rows:
    """The tokens that run a branch (`run` [B, T]), packed."""
    return Rows(run, run.reshape(-1).nonzero().squeeze(-1))


class AdapterRows:
    """The rows of one layer's projection calls that add the LoRA delta: none (no adapter), all
    (`mask` None), or those where `mask` [N] is True. A projection is one dense call over every
    row plus a rank-R call over the adapted rows only."""

    def __init__(self, lora: LoraAdapter | None, layer: int, mask: torch.Tensor | None):
        self.lora, self.layer = lora, layer
        self.index: torch.Tensor | None = None  # the adapted rows when only some are
        if lora is not None and mask is not None:
            n = int(mask.sum())
            if n == 0:
                self.lora = None
            elif n < mask.numel():
                self.index = mask.nonzero().squeeze(-1)

    def linear(self, name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """`module(x)` for rows x [N, in], plus the adapter's delta on the adapted rows."""
        y = module.project(x) if hasattr(module, "project") else F.linear(x, module.weight, module.bias)
        if self.lora is None:
            return y
        if self.index is None:
            return self.lora.add_delta(self.layer, name, x, y)
        return y.index_add(0, self.index, self.lora.delta(self.layer, name, x.index_select(0, self.index)))
