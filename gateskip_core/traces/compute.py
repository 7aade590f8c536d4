"""Compute account: FLOPs of the dense model and of execution under skip decisions.

Counted (2 FLOPs per multiply-add), per token and layer: q, k, v, o projections;
attention scores (q . k) and weighted sum (p . v) over the keys the token can see;
the three MLP projections; the LM head for every position whose logits are
produced; the gates' own cost; stand-ins of skipped branches; and a LoRA adapter's
per-row deltas (2R(in + out) per projection, for the rows that use it: every token under
adapter scope 'all', tokens from their first skip on under 'skipped'). Norms, rotary embeddings, softmax and
activations are elementwise and not counted (nor does FlopCounterMode count them).

Conventions for attention keys per query:
- `causal` (the default, what the physical path needs): query t sees t + 1 keys
  (at most the sliding window on Gemma-3's local layers);
- `full`: every query is charged for all T keys, the convention
  `torch.utils.flop_counter.FlopCounterMode` uses for eager attention.

Three totals:
- `dense_flops`: the ungated model, every token through every branch;
- `skipping_flops`: what the decisions cost when skipped work is not done, gates, stand-ins and
  adapter rows included, each counted once: a function of the decisions alone, the same whichever
  path (masked, physical, cached decoding) produced them;
- `executed_flops`: what this call really executed (physical: `skipping_flops`;
  masked: dense plus every overhead, since masking computes everything, every adapted row's
  deltas included, and discards what is skipped).
`net_saved_fraction = 1 - skipping_flops / dense_flops`: negative when the gates
cost more than the skips save.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only a type here: the account reads no torch
    from gateskip_core.backbone.architecture import ArchSpec


FLOP_CONVENTIONS = ("causal", "full")


@dataclass(frozen=True)
class ComputeAccount:
    dense_flops: float
    skipping_flops: float
    executed_flops: float
    gate_flops: float  # the overhead under the decisions: gates, stand-ins of skipped branches, adapter rows
    tokens: int

    @property
    def net_saved_fraction(self) -> float:
        return 1.0 - self.skipping_flops / self.dense_flops if self.dense_flops else 0.0

    def __add__(self, other: ComputeAccount) -> ComputeAccount:
        return ComputeAccount(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "net_saved_fraction": self.net_saved_fraction}


@dataclass(frozen=True)
class LayerCosts:
    """FLOPs per token of each piece of one layer (keys-dependent parts per key)."""

    q: int
    kv: int
    o: int
    attn_per_key: int
    mlp: int
    lm_head: int

    @classmethod
    def of(cls, spec: ArchSpec) -> LayerCosts:
        d, hd = spec.d_model, spec.head_dim
        return cls(
            q=2 * d * spec.n_heads * hd,
            kv=2 * 2 * d * spec.n_kv_heads * hd,
            o=2 * spec.n_heads * hd * d,
            attn_per_key=2 * 2 * spec.n_heads * hd,  # scores and weighted sum
            mlp=spec.mlp_projections * 2 * d * spec.d_ff,
            lm_head=2 * d * spec.vocab_size,
        )


def keys_per_query(
    spec: ArchSpec, layer: int, query_positions: np.ndarray, n_total: int, convention: str
) -> np.ndarray:
    """How many keys each query attends over (see module docstring)."""
    if convention == "full":
        return np.full(query_positions.shape, n_total, dtype=np.float64)
    if convention != "causal":
        raise ValueError(f"convention must be one of {FLOP_CONVENTIONS}")
    n = query_positions.astype(np.float64) + 1
    window = spec.layers[layer].sliding_window
    return np.minimum(n, window) if window is not None else n


def account_sequence(
    spec: ArchSpec,
    skipped: np.ndarray,  # [T, L, 2] bool for one sequence's real tokens, in order
    gate_flops_per_branch: tuple[int, int],  # (attn, mlp) per token; (0, 0) without gates
    lm_head_tokens: int,
    path: str,
    kv_copy: bool = False,
    convention: str = "causal",
    first_position: int = 0,
    fill_flops: tuple[int, int] = (0, 0),
    adapter_flops: tuple[int, int, int] = (0, 0, 0),
    adapter_scope: str = "all",
) -> ComputeAccount:
    """The account for one sequence (positions first_position .. first_position + T - 1).

    `fill_flops`: (attention, MLP) FLOPs each skipped token spends on its stand-in (`fill.py`),
    charged like the gates: in the skipping total, counted in `gate_flops` (the overhead).
    `adapter_flops`: a LoRA adapter's delta FLOPs per adapted row and layer for (k + v, q + o,
    MLP) (`LoraAdapter.flops_per_row`), charged where the row runs that part with the adapter
    (`adapter_scope`), also in `gate_flops`."""
    costs = LayerCosts.of(spec)
    T = skipped.shape[0]
    positions = np.arange(first_position, first_position + T)
    dense = skipping = 0.0
    for layer in range(spec.n_layers):
        keys = keys_per_query(spec, layer, positions, first_position + T, convention)
        attn_query_side = costs.q + costs.o + costs.attn_per_key * keys  # [T]
        run_attn = ~skipped[:, layer, 0]
        run_mlp = ~skipped[:, layer, 1]
        kv_tokens = T - (int((~run_attn).sum()) if (kv_copy and layer > 0) else 0)
        dense += T * costs.kv + attn_query_side.sum() + T * costs.mlp
        skipping += kv_tokens * costs.kv + attn_query_side[run_attn].sum() + run_mlp.sum() * costs.mlp
    gates = float(T * spec.n_layers * sum(gate_flops_per_branch))
    gates += float(skipped[..., 0].sum() * fill_flops[0] + skipped[..., 1].sum() * fill_flops[1])
    adapter = adapter_run = 0.0
    if any(adapter_flops):
        adapter, adapter_run = _adapter_flops(skipped, adapter_flops, adapter_scope, kv_copy)
    head = float(lm_head_tokens * costs.lm_head)
    dense += head
    skipping += head + gates + adapter_run
    executed = skipping if path == "physical" else dense + gates + adapter
    return ComputeAccount(
        dense_flops=float(dense),
        skipping_flops=float(skipping),
        executed_flops=float(executed),
        gate_flops=gates + adapter_run,
        tokens=T,
    )


def adapted_rows(skipped: np.ndarray, scope: str) -> np.ndarray:
    """[..., L, 2] bool: the token is on the adapter at (layer, branch): always in scope 'all'; in
    'skipped' from its first skipped branch (walk order: attention, then MLP, layer by layer) on."""
    if scope != "skipped":
        return np.ones(skipped.shape, dtype=bool)
    *lead, L, _ = skipped.shape
    return np.logical_or.accumulate(skipped.reshape(*lead, 2 * L), axis=-1).reshape(skipped.shape)


def _adapter_flops(skipped: np.ndarray, flops: tuple[int, int, int], scope: str, kv_copy: bool) -> tuple[float, float]:
    """The LoRA deltas' FLOPs as (every adapted row computing every delta, what the masked path
    executes; only the parts each adapted row runs: k/v where its keys/values are projected, q/o
    where it runs attention, the MLP where it runs it, what the decisions cost)."""
    adapted = adapted_rows(skipped, scope)
    every = float(adapted[..., 0].sum() * (flops[0] + flops[1]) + adapted[..., 1].sum() * flops[2])
    run_attn, run_mlp = ~skipped[..., 0], ~skipped[..., 1]
    kv_rows = adapted[..., 0].copy()
    if kv_copy:
        kv_rows[:, 1:] &= run_attn[:, 1:]
    run = float(
        kv_rows.sum() * flops[0]
        + (adapted[..., 0] & run_attn).sum() * flops[1]
        + (adapted[..., 1] & run_mlp).sum() * flops[2]
    )
    return every, run


def branch_saving_flops(spec: ArchSpec, context: int = 256) -> np.ndarray:
    """[n_layers, 2] FLOPs one token saves by skipping each (layer, branch) (attention: the query
    side at `context` keys, capped by the sliding window; MLP: all of it). Weights of a global budget."""
    costs = LayerCosts.of(spec)
    out = np.zeros((spec.n_layers, 2))
    for layer in range(spec.n_layers):
        keys = keys_per_query(spec, layer, np.array([context - 1]), context, "causal")[0]
        out[layer] = (costs.q + costs.o + costs.attn_per_key * keys, costs.mlp)
    return out


def decode_step_bytes(
    spec: ArchSpec,
    run: np.ndarray,  # [L, 2] bool: some token of the step runs (layer, branch)
    context: int,
    batch: int,
    gate_params: tuple[int, int] = (0, 0),
    bytes_per_param: int = 4,
    adapter_run: np.ndarray | None = None,  # [L, 3] bool: some token of the step adds the LoRA delta
    adapter_params: tuple[int, int, int] = (0, 0, 0),  # LoRA parameters per layer: (k + v, q + o, MLP)
) -> float:
    """Bytes one decoding step reads (the bytes-read model of batch-small decoding on a CPU, where
    a step's time follows the weights it touches): every layer's k/v projections (every token's
    keys/values are computed) and gates; q/o projections and the KV cache only where some token of
    the step runs attention; the MLP weights only where some token runs it; a LoRA adapter's
    matrices for (k/v, q/o, MLP) where some token on the adapter runs that part; the LM head."""
    costs = LayerCosts.of(spec)
    params = costs.kv / 2 + sum(gate_params)  # always read, per layer
    total = 0.0
    for layer in range(spec.n_layers):
        window = spec.layers[layer].sliding_window
        seen = min(context, window) if window is not None else context
        kv_cache = 2 * seen * spec.n_kv_heads * spec.head_dim * batch
        total += params
        total += run[layer, 0] * ((costs.q + costs.o) / 2 + kv_cache)
        total += run[layer, 1] * costs.mlp / 2
        if adapter_run is not None:
            total += float(np.dot(adapter_run[layer], adapter_params))
    total += costs.lm_head / 2 + batch * spec.d_model  # LM head, embedding rows
    return total * bytes_per_param
