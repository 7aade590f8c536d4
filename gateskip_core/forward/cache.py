"""The KV cache of one generation call: keys/values per layer and per-token bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys/values and per-token bookkeeping of earlier tokens, for one generation call.

    Keys/values live in buffers with room to spare (`reserve` sizes them for a whole
    generation; they double when full), so a decoding step writes its one slot instead of
    copying the whole cache with `torch.cat`.
    """

    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H_kv, capacity, hd]
    values: list[torch.Tensor] = field(default_factory=list)
    slot_real: torch.Tensor | None = None  # [B, S] bool: slot holds a real token
    n_real: torch.Tensor | None = None  # [B] real tokens so far
    gate: torch.Tensor | None = None  # [B, S, L, 2] (running-quantile history)
    eligible: torch.Tensor | None = None  # [B, S]
    capacity: int = 0  # slots to allocate on first use (0: what the first call needs)

    @property
    def n_slots(self) -> int:
        return 0 if self.slot_real is None else self.slot_real.shape[1]

    def reserve(self, slots: int) -> KVCache:
        """Allocate room for `slots` tokens in all (prompt + new tokens) when the buffers are made."""
        self.capacity = max(self.capacity, slots)
        return self

    def append_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Add this call's keys/values [B, H_kv, T, hd] of `layer`; returns all of that layer's."""
        start, end = self.n_slots, self.n_slots + keys.shape[2]
        if len(self.keys) <= layer:
            shape = (*keys.shape[:2], max(end, self.capacity), keys.shape[3])
            self.keys.append(keys.new_empty(shape))
            self.values.append(values.new_empty(shape))
        elif self.keys[layer].shape[2] < end:  # full: double
            grown = max(end, 2 * self.keys[layer].shape[2])
            for buffers in (self.keys, self.values):
                old = buffers[layer]
                buffers[layer] = old.new_empty((*old.shape[:2], grown, old.shape[3]))
                buffers[layer][:, :, :start] = old[:, :, :start]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def crop(self, n_slots: int) -> None:
        """Forget every slot from `n_slots` on; the next call writes there (speculative decoding drops
        the draft's slots and the verifier's rejected ones). The buffers keep their room."""
        self.slot_real = self.slot_real[:, :n_slots]
        self.n_real = self.slot_real.long().sum(1)
        self.gate = self.gate[:, :n_slots]
        self.eligible = self.eligible[:, :n_slots]

    def append_tokens(self, slot_real, n_real, gate, eligible) -> None:
        """Add this call's per-token bookkeeping (after every layer appended its keys/values)."""
        self.slot_real = slot_real
        self.n_real = n_real
        self.gate = gate if self.gate is None else torch.cat([self.gate, gate], 1)
        self.eligible = eligible if self.eligible is None else torch.cat([self.eligible, eligible], 1)
